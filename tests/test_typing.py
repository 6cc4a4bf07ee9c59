"""The typed public API: mypy accepts a typed program using it and rejects wrong calls,
and the stubs (cynorm/_api.pyi, nn.pyi, torch.pyi) list exactly the parameters the
functions and layers take at run time."""
import ast
import inspect
import os
import subprocess
import sys

import pytest

import cynorm
import cynorm.nn

ROOT = os.path.dirname(os.path.dirname(cynorm.__file__))
PKG = os.path.dirname(cynorm.__file__)
TESTS = os.path.dirname(os.path.abspath(__file__))

BAD = '''\
import numpy as np
import cynorm
x = np.zeros((2, 4, 3), np.float32)
cynorm.group_norm(x, "four")
cynorm.layer_norm(x, 3, stats="three_pass")
y: np.ndarray = cynorm.rms_norm(x, 3, return_stats=True)
cynorm.nn.GroupNorm(2, 4, affine="yes")
'''


def test_mypy_accepts_typed_usage_and_rejects_wrong_calls(tmp_path):
    api = pytest.importorskip("mypy.api")
    bad = tmp_path / "wrong_calls.py"
    bad.write_text(BAD.replace("import cynorm\n", "import cynorm\nimport cynorm.nn\n"))
    usage = os.path.join(TESTS, "typed_usage.py")
    out, err, status = api.run([
        "--cache-dir", str(tmp_path / "cache"), "--no-error-summary",
        "--config-file", os.path.join(ROOT, "pyproject.toml"), usage, str(bad)])
    lines = [ln for ln in out.splitlines() if ": error:" in ln]
    assert not [ln for ln in lines if "typed_usage.py" in ln], out
    flagged = {int(ln.split(":")[1]) for ln in lines if "wrong_calls.py" in ln}
    # line numbers in the file written above (one import added)
    assert flagged == {5, 6, 7, 8}, out + err
    assert status == 1


def test_typed_usage_runs():
    subprocess.run([sys.executable, os.path.join(TESTS, "typed_usage.py")], check=True,
                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def stub_signatures(path):
    """name -> [(parameter name, kind)] of the first definition in a stub, and of each
    class's __init__ as 'Class'."""
    tree = ast.parse(open(path).read())
    out = {}

    def params(fn):
        a = fn.args
        res = [(p.arg, "POSITIONAL_OR_KEYWORD") for p in a.posonlyargs + a.args]
        if a.vararg:
            res.append((a.vararg.arg, "VAR_POSITIONAL"))
        res += [(p.arg, "KEYWORD_ONLY") for p in a.kwonlyargs]
        if a.kwarg:
            res.append((a.kwarg.arg, "VAR_KEYWORD"))
        return [p for p in res if p[0] != "self"]

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out.setdefault(node.name, params(node))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    out[node.name] = params(item)
    return out


def runtime_params(obj):
    sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    return [(p.name, p.kind.name.replace("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD"))
            for p in sig.parameters.values() if p.name != "self"]


def test_api_stub_matches_the_functions():
    stubs = stub_signatures(os.path.join(PKG, "_api.pyi"))
    stubs.update(stub_signatures(os.path.join(PKG, "_standardize.pyi")))
    stubs.update(stub_signatures(os.path.join(PKG, "_stats_api.pyi")))
    stubs.update(stub_signatures(os.path.join(PKG, "_pool.pyi")))
    # the package-internal helpers the stubs also declare are not part of the API
    stubs = {k: v for k, v in stubs.items() if not k.startswith("_")
             and k not in ("empty", "empty_like")}
    ops = [n for n in cynorm.__all__ if n not in ("get_num_threads", "show_config")
           and not isinstance(getattr(cynorm, n), type)]
    assert sorted(ops) == sorted(stubs)
    for name in ops:
        assert stubs[name] == runtime_params(getattr(cynorm, name)), name


def test_layer_stub_matches_the_layers():
    stubs = stub_signatures(os.path.join(PKG, "nn.pyi"))
    for name in cynorm.nn.__all__:
        assert stubs[name] == runtime_params(getattr(cynorm.nn, name)), name


def test_torch_stub_matches_the_bridge():
    pytest.importorskip("torch")
    import cynorm.torch as ct
    stubs = stub_signatures(os.path.join(PKG, "torch.pyi"))
    tree = ast.parse(open(os.path.join(PKG, "torch.pyi")).read())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    for name in ct.__all__:
        obj = getattr(ct, name)
        if inspect.isfunction(obj):
            assert stubs[name] == runtime_params(obj), name
        else:
            assert name in classes, name
