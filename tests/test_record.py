"""Every stored key is named once, in :mod:`adapruner.search.record`."""

import ast
from pathlib import Path

from adapruner.search.record import FINISHED, StudyKey, TrialKey, baseline_attrs, baseline_of, draw_of, searched

ROOT = Path(__file__).resolve().parent.parent
STORED = {v for cls in (StudyKey, TrialKey) for k, v in vars(cls).items() if k.isupper()}


def _is_attrs(node: ast.AST, aliases: set[str]) -> bool:
    """``node`` is a trial's or study's ``user_attrs`` (or a name bound to one in the same function)."""
    if isinstance(node, ast.Attribute) and node.attr == "user_attrs":
        return True
    return isinstance(node, ast.Name) and node.id in aliases


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _reads_one_key(call: ast.Call) -> bool:
    """``stored(attrs, Key.X)``: the value of one key, not the attributes themselves."""
    return isinstance(call.func, ast.Name) and call.func.id == "stored"


def stored_key_literals(source: str) -> list[tuple[int, str]]:
    """``(line, key)`` for each user-attribute key written as a string literal in ``source``."""
    tree = ast.parse(source)
    aliases = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and (_is_attrs(node.value, set()) or isinstance(node.value, ast.Call) and node.value.args
                    and _is_attrs(node.value.args[0], set()) and not _reads_one_key(node.value))
               for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        keys: list[ast.AST] = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "set_user_attr" and node.args:
                keys.append(node.args[0])
            elif node.func.attr == "get" and node.args and _is_attrs(node.func.value, aliases):
                keys.append(node.args[0])
            for keyword in node.keywords:
                if keyword.arg == "user_attrs" and isinstance(keyword.value, ast.Dict):
                    keys += [k for k in keyword.value.keys if k is not None]
        elif isinstance(node, ast.Subscript) and _is_attrs(node.value, aliases):
            keys.append(node.slice)
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            if any(_is_attrs(c, aliases) for c in node.comparators):
                keys.append(node.left)
        found += [(node.lineno, key) for key in map(_literal, keys) if key is not None]
    return found


def test_the_check_finds_every_way_of_writing_a_key():
    source = '''
def f(trial, study, attrs_of):
    trial.set_user_attr("config", 1)
    study.user_attrs.get("job")
    trial.user_attrs["sizes"]
    "baseline" in trial.user_attrs
    study.enqueue_trial({}, user_attrs={"draw": 0})
    attrs = trial.user_attrs
    attrs.get("windows")
    copied = dict(trial.user_attrs)
    copied["draws"] = []
    trial.user_attrs.get(TrialKey.CONFIG)  # named: fine
    other = {"ratio": 1}
    other.get("ratio")  # not a user attribute: fine
'''
    assert [key for _, key in stored_key_literals(source)] == [
        "config", "job", "sizes", "baseline", "draw", "windows", "draws"]


def test_no_stored_key_is_written_as_a_literal_outside_the_records_module():
    offenders = []
    for folder in ("adapruner", "service", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "record.py":
                continue
            offenders += [f"{path.relative_to(ROOT)}:{line}: {key!r}"
                          for line, key in stored_key_literals(path.read_text())]
    assert not offenders, "name these keys through adapruner.search.record:\n" + "\n".join(offenders)


def test_every_stored_key_is_named_once():
    names = [v for cls in (StudyKey, TrialKey) for k, v in vars(cls).items() if k.isupper()]
    assert len(names) == len(set(names)) == len(STORED)


class _Trial:
    def __init__(self, **attrs):
        self.user_attrs = attrs


def test_the_helpers_read_baselines_and_draws():
    base, other, plain = _Trial(**baseline_attrs("flap", 0)), _Trial(**baseline_attrs("llm-pruner", 2)), _Trial()
    assert (baseline_of(base), draw_of(base)) == ("flap", 0)
    assert (baseline_of(other), draw_of(other)) == ("llm-pruner", 2)
    assert (baseline_of(plain), draw_of(plain)) == (None, 0)
    assert searched([base, plain, other]) == [plain]
    assert {s.name for s in FINISHED} == {"COMPLETE", "PRUNED"}
