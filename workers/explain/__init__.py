"""One module per job kind, each exposing ``run(model, inputs, params, progress) -> KindResult``.

The modules know nothing of Redis or HTTP; ``workers.tasks`` maps RQ jobs onto them.
"""
