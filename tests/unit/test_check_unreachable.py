"""scripts/check_unreachable.py: the lint that flags a statement after return / raise / continue / break."""
import ast
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_unreachable.py"
_spec = importlib.util.spec_from_file_location("check_unreachable", SCRIPT)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

# The shape of issue 13's item 1: a divisibility check placed after a property's return.
DEAD = '''
class C:
    @property
    def d(self):
        return self.a
        if self.p % self.u:
            raise ValueError("never checked")

def f(xs):
    for x in xs:
        if x:
            continue
            print(x)
        try:
            pass
        except ValueError:
            raise
            y = 1
    while True:
        break
        z = 2
'''

LIVE = '''
def g(x):
    if x:
        return 1
    elif x is None:
        raise ValueError("x")
    else:
        pass
    for i in range(3):
        if i:
            break
    else:
        return 2
    return 3
'''


def test_flags_every_statement_after_a_terminal_one():
    assert sorted(check.unreachable(ast.parse(DEAD))) == [(6, "return"), (13, "continue"), (18, "raise"), (21, "break")]


def test_clean_control_flow_is_not_flagged(tmp_path):
    assert list(check.unreachable(ast.parse(LIVE))) == []
    (tmp_path / "ok.py").write_text(LIVE)
    (tmp_path / "bad.py").write_text(DEAD)
    assert check.main([str(tmp_path / "ok.py")]) == 0
    assert check.main([str(tmp_path)]) == 1
    assert sorted(int(p.split(":")[1]) for p in check.check_paths([str(tmp_path)])) == [6, 13, 18, 21]
