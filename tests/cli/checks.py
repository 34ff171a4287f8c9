"""The CLI tests' check counter: one line per check ("PASS name" or "FAIL
name: detail"), and the closing "N passed, M failed" line whose exit status
ctest reads. Imported by the tests/cli/test_*.py scripts beside it (they
run as scripts, so this folder is on sys.path)."""


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def __call__(self, name, ok, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print("%s %s%s" % ("PASS" if ok else "FAIL", name,
                           ": " + detail if detail else ""), flush=True)
        return ok

    def finish(self):
        """Prints the summary line; the exit status: 1 if any check failed."""
        print("%d passed, %d failed" % (self.passed, self.failed))
        return 1 if self.failed else 0
