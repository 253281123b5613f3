"""``import stepaudit`` stays cheap: no explainer, report, doctor or pandas until a name needs them.

Each check runs in a fresh interpreter: this test session has imported half the package already.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("stepaudit.explain", "stepaudit.report", "stepaudit.doctor", "pandas")


def _modules_after(code: str) -> list[str]:
    """The modules loaded by ``code`` in a fresh interpreter (stepaudit's, and the heavy third-party ones)."""
    script = f"import sys\n{code}\nimport json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_import_stepaudit_loads_no_submodule():
    modules = _modules_after("import stepaudit")
    assert [m for m in modules if m.startswith("stepaudit")] == ["stepaudit"]
    assert _heavy(modules) == []


def test_the_audit_path_loads_neither_the_explainer_nor_the_report_nor_the_doctor():
    modules = _modules_after("import stepaudit\nstepaudit.Audit, stepaudit.AuditError, stepaudit.load")
    assert "stepaudit.audit" in modules and "stepaudit.store" in modules
    assert _heavy(modules) == []


def test_every_public_name_still_resolves_and_explain_stays_the_function():
    code = (
        "import stepaudit\n"
        "import stepaudit.explain.cli\n"  # loading the subpackage must not shadow the function
        "assert callable(stepaudit.explain) and not isinstance(stepaudit.explain, type(stepaudit))\n"
        "from stepaudit import *\n"
        "assert set(stepaudit.__all__) <= set(dir(stepaudit))\n"
        "assert all(getattr(stepaudit, n) is not None for n in stepaudit.__all__)\n"
        "from stepaudit import Audit, AuditError, RunStoreError, load, explain\n"
        "assert explain('x * y', at={'x': 2.0, 'y': 3.0})['grads'] == {'x': 3.0, 'y': 2.0}\n"
        "try:\n"
        "    stepaudit.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('stepaudit.no_such_name resolved')\n"
    )
    _modules_after(code)  # check=True: any failed assertion fails the run
