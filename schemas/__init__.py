"""The contract between the API (`service/`) and the workers (`workers/`).

Pydantic models for every request, job status, result and error, plus the settings
object. Imports neither FastAPI nor torch: both sides import it, nothing else is shared.
"""
