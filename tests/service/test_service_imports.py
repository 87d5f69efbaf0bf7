"""DESIGN rule 2: the API never imports torch, torchvision or captum, and starts fast."""

import subprocess
import sys

from tests.conftest import ROOT


def test_service_imports_no_torch_and_starts_under_2s():
    # CPU time of import + first request: robust to other processes loading the machine.
    code = (
        "import sys, time; t = time.process_time(); import service.main; "
        "from fastapi.testclient import TestClient; TestClient(service.main.app).get('/healthz'); "
        "print(time.process_time() - t, [m for m in ('torch', 'torchvision', 'captum', 'workers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    seconds, loaded = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert loaded == "[]", f"service imported {loaded}"
    assert float(seconds) < 2.0, f"app import + first request took {seconds} s of CPU"
