"""Run many tinymim command lines in one process, each as `tinymim ...` would run it, and report each
one's exit status and everything it wrote to stderr (log records, warnings and messages).

    python cli_driver.py CASES.json RESULTS.json WORKSPACE   (CASES: a list of argument lists)

Each result also lists what the case changed under WORKSPACE (files created, modified or removed).
"""
import contextlib
import io
import json
import logging
import os
import sys
import traceback
import warnings


def snapshot(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def run_case(argv: list[str]) -> dict:
    from tinymim.cli import main

    root = logging.getLogger()
    for handler in root.handlers[:]:  # main() configures logging afresh, onto this case's stderr
        root.removeHandler(handler)
    warnings.resetwarnings()  # each case sees the warnings a fresh process would
    warnings.simplefilter("default")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:  # noqa: BLE001 - a traceback is what the scan looks for
            rc = "traceback"
            err.write(traceback.format_exc())
    return {"argv": argv, "rc": rc, "stderr": err.getvalue()}


if __name__ == "__main__":
    cases = json.loads(open(sys.argv[1]).read())
    results = []
    for argv in cases:
        before = snapshot(sys.argv[3])
        result = run_case(argv)
        after = snapshot(sys.argv[3])
        result["written"] = sorted((set(after) ^ set(before)) | {k for k in before if after.get(k) != before[k]})
        results.append(result)
    with open(sys.argv[2], "w") as f:
        json.dump(results, f, indent=1)
