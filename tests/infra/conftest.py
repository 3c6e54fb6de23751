import sys
from pathlib import Path

# The helpers (infra.py, hcl_eval.py) sit beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
