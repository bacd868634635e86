"""Build and cache the real engines' environments the adapter tests run in.

The adapter tests run SGLang's and vLLM's own code, which cannot live in the main
``.venv`` (their pins conflict with ours and with each other, and vLLM alone is
~2 GB). Each engine gets its own venv under a cache folder outside the repository:

    ${ENGINETIME_ENGINE_VENVS:-~/.cache/enginetime/engine-venvs}/<engine>-<version>

built on first use by following a *recipe* (pip steps, recorded in this file) and
marked complete with the recipe's hash. A later run whose recipe hash matches the
marker reuses the venv in well under a second; a changed recipe rebuilds it. A
build holds a file lock, so two pytest processes never build the same venv at once.

The recipes follow ../shared/ENGINES.md: the CPU torch 2.13.0 wheel that lies on
this machine's disk, the engine itself with ``--no-deps`` (its declared deps pull
CUDA builds), then only the pure-Python packages its imports need. A constraints
file that pins torch and makes torchvision unsatisfiable is passed to every step,
so no dependency can silently swap in a CUDA torch or torchvision: the install
fails and says so instead.

Our own package reaches the engine's Python without installing it there: ``shim()``
lays out a folder with the ``enginetime`` import tree as symlinks into this checkout
(following pyproject's package-dir mapping) and an ``enginetime-<v>.dist-info``
whose ``entry_points.txt`` is pyproject's ``[project.entry-points]``. Put that
folder on PYTHONPATH and the engine's own plugin loaders find our entry points
exactly as they would after ``pip install enginetime``, while every edit to the
source is live (nothing to rebuild).

Run ``python tests/engine_envs.py vllm sglang sglang-0.5.4 phoenix`` to build ahead of a test run
(``phoenix``: Arize Phoenix, the trace backend tests/test_tracing.py and tests/test_trace_ui.py use).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE_ENV = "ENGINETIME_ENGINE_VENVS"
MARKER = ".enginetime-complete"
TORCH_PIN = "torch==2.13.0"  # the CPU build on this machine's disk (pip's find-links)

# Every pip step gets these constraints: keep the CPU torch, never accept torchvision
# (PyPI's torchvision wheels require a CUDA torch and ~19 NVIDIA packages).
CONSTRAINTS = f"{TORCH_PIN}\ntorchvision==0.0.0.post999\n"


@dataclass(frozen=True)
class Recipe:
    """How to build one engine environment: ordered pip invocations, or a wheel to unpack."""

    name: str  # folder name under the cache, e.g. "vllm-0.33.0"
    engine: str
    version: str
    pip_steps: tuple[tuple[str, ...], ...] = ()
    unpack_wheel: str | None = None  # "sglang==0.5.4": download and unpack only (source inspection)
    notes: str = ""
    check_torch: bool = True  # engines: fail the build if a CUDA torch slipped in

    def digest(self) -> str:
        blob = json.dumps(
            [self.name, self.pip_steps, self.unpack_wheel, CONSTRAINTS, sys.version_info[:2]], sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


VLLM_VERSION = "0.33.0"
SGLANG_VERSION = "0.5.23"
SGLANG_OLD_VERSION = "0.5.4"
#: A trace backend with a web UI (tests/test_tracing.py queries it; docs/OBSERVABILITY.md shows it).
PHOENIX_VERSION = "20.26.1"

RECIPES: dict[str, Recipe] = {
    "vllm": Recipe(
        name=f"vllm-{VLLM_VERSION}",
        engine="vllm",
        version=VLLM_VERSION,
        pip_steps=(
            (TORCH_PIN,),
            ("--no-deps", f"vllm=={VLLM_VERSION}", "xgrammar==0.2.8", "apache-tvm-ffi==0.1.11"),
            (
                # the pure-Python imports vLLM's scheduler path needs (ranges from vLLM's metadata)
                "transformers>=5.16.1,<5.21.0",
                "huggingface_hub>=1.31.0",
                "tokenizers>=0.23.2",
                "safetensors>=0.6.2",
                "msgspec",
                "pydantic>=2.12.0",
                "cachetools",
                "regex",
                "psutil",
                "numpy",
                "blake3",
                "py-cpuinfo",
                "cloudpickle",
                "pyzmq>=25.0.0",
                "pyyaml",
                "sentencepiece",
                "einops",
                "cbor2",
                "aiohttp>=3.14.4",
                "openai>=2.25.0",
                "openai-harmony",
                "pillow>=13.0.0",
                "pybase64",
                "uvloop",
                "prometheus_client>=0.18.0",
                "fastapi>=0.133.0,<0.137.0",
                "partial-json-parser",
                "llguidance>=1.7.0,<1.8.0",
                "setproctitle",
                "requests",
                "tqdm",
                "filelock",
            ),
        ),
    ),
    "sglang": Recipe(
        name=f"sglang-{SGLANG_VERSION}",
        engine="sglang",
        version=SGLANG_VERSION,
        pip_steps=(
            (TORCH_PIN,),
            # sglang's declared deps pull CUDA kernels; triton only for `import triton`
            (
                "--no-deps",
                f"sglang=={SGLANG_VERSION}",
                "triton",
                "apache-tvm-ffi==0.1.11",
                "compressed-tensors==0.18.0",
            ),
            (
                # what the scheduler modules import, at sglang 0.5.23's pins where it has them
                "transformers==5.19.0",
                "tokenizers==0.23.2",
                "openai==2.8.0",
                "sentencepiece==0.2.1",
                "blobfile==3.0.0",
                "openai-harmony==0.0.4",
                "numpy",
                "pybase64",
                "pillow",
                "starlette",
                "fastapi",
                "uvicorn>=0.51",
                "python-multipart",
                "IPython",
                "aiohttp",
                "gguf",
                "partial-json-parser",
                "psutil",
                "pyzmq>=25.1.2",
                "msgspec",
                "requests",
                "tqdm",
                "pydantic",
                "orjson",
                "uvloop",
                "setproctitle",
                "einops",
                "prometheus-client>=0.20.0",
                "packaging",
                "huggingface_hub",
                "safetensors",
                "dill",
                "loguru",
                "xxhash",
                "regex",
            ),
        ),
    ),
    "sglang-0.5.4": Recipe(
        name=f"sglang-{SGLANG_OLD_VERSION}-src",
        engine="sglang",
        version=SGLANG_OLD_VERSION,
        unpack_wheel=f"sglang=={SGLANG_OLD_VERSION}",
        notes="source only: the launcher check reads the classes it patches from the wheel",
    ),
    "phoenix": Recipe(
        name=f"phoenix-{PHOENIX_VERSION}",
        engine="arize-phoenix",
        version=PHOENIX_VERSION,
        pip_steps=((f"arize-phoenix=={PHOENIX_VERSION}",),),
        notes="an OTLP trace backend with a web UI, not an engine: no torch",
        check_torch=False,
    ),
}


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "enginetime" / "engine-venvs")
    return Path(root).expanduser()


@dataclass
class EngineEnv:
    """A built engine environment."""

    recipe: Recipe
    path: Path
    build_seconds: float  # 0.0 when it came from the cache

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def source_root(self) -> Path:
        """Where the engine's package sources lie (site-packages, or the unpacked wheel)."""
        if self.recipe.unpack_wheel:
            return self.path / "src"
        out = subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        )
        return Path(out.stdout.strip())


class EngineEnvError(RuntimeError):
    """An engine environment could not be built; the message says which step and why."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, what: str) -> None:
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise EngineEnvError(f"{what} failed (exit {proc.returncode}); log {log}:\n{tail}")


def _build(recipe: Recipe, path: Path, log: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    constraints = path / "constraints.txt"
    constraints.write_text(CONSTRAINTS)
    if recipe.unpack_wheel:
        dl = path / "dl"
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dl), recipe.unpack_wheel],
            log,
            f"downloading {recipe.unpack_wheel}",
        )
        wheels = list(dl.glob("*.whl"))
        if len(wheels) != 1:
            raise EngineEnvError(f"expected one wheel for {recipe.unpack_wheel}, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(path / "src")
        shutil.rmtree(dl)
        return
    # The interpreter the tests run on (3.11 here): the engines ship cp311 wheels.
    _run([sys.executable, "-m", "venv", str(path)], log, "creating the venv")
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints)]
    for i, step in enumerate(recipe.pip_steps, 1):
        what = f"{recipe.name}: pip step {i}/{len(recipe.pip_steps)} ({' '.join(step)[:80]})"
        _run([*pip, *step], log, what)
    if recipe.check_torch:
        _check_no_cuda_torch(path, log)


def _check_no_cuda_torch(path: Path, log: Path) -> None:
    """Fail the build if a CUDA torch or torchvision slipped in after all."""
    code = (
        "import importlib.util, torch, sys\n"
        "bad = [m for m in ('torchvision',) if importlib.util.find_spec(m)]\n"
        "print(torch.__version__, torch.version.cuda, bad)\n"
        "sys.exit(1 if (torch.version.cuda or bad) else 0)\n"
    )
    _run([str(path / "bin" / "python"), "-c", code], log, "checking torch is the CPU build, no torchvision")


def ensure(key: str, *, build: bool = True) -> EngineEnv:
    """Return the built environment for ``key`` (a RECIPES key), building it if needed.

    Raises EngineEnvError with the failing step's log tail when it cannot be built.
    """
    recipe = RECIPES[key]
    root = cache_root()
    path = root / recipe.name
    marker = path / MARKER
    digest = recipe.digest()

    def fresh() -> bool:
        try:
            return json.loads(marker.read_text()).get("recipe") == digest
        except (OSError, ValueError):
            return False

    if fresh():
        return EngineEnv(recipe, path, 0.0)
    if not build:
        raise EngineEnvError(f"{path} is not built (run python tests/engine_envs.py {key})")
    with _locked(root / f".{recipe.name}.lock"):
        if fresh():  # another process built it while we waited
            return EngineEnv(recipe, path, 0.0)
        log = root / f"{recipe.name}.build.log"
        log.write_text(f"building {recipe.name} (recipe {digest})\n")
        t0 = time.monotonic()
        _build(recipe, path, log)
        seconds = time.monotonic() - t0
        marker.write_text(json.dumps({"recipe": digest, "built_s": round(seconds, 1), "at": time.time()}))
        return EngineEnv(recipe, path, seconds)


# ---------------------------------------------------------------------------
# our package inside the engine's interpreter


#: Developers only: read package mapping and entry points from another pyproject
#: (e.g. a copy with entry points not yet merged). Tests use the repository's.
PYPROJECT_ENV = "ENGINETIME_SHIM_PYPROJECT"


def _pyproject() -> dict:
    path = os.environ.get(PYPROJECT_ENV) or str(REPO / "pyproject.toml")
    return tomllib.loads(Path(path).read_text())


def declared_entry_points(group: str) -> dict[str, str]:
    """pyproject's ``[project.entry-points.<group>]`` table ({} when it is missing)."""
    return dict(_pyproject().get("project", {}).get("entry-points", {}).get(group, {}))


def shim(dest: Path) -> Path:
    """Lay out ``dest`` so that ``PYTHONPATH=dest`` imports this checkout as ``enginetime``.

    Mirrors pyproject's package-dir mapping with symlinks and writes a dist-info with
    the declared entry points, so importlib.metadata (which both engines' plugin
    loaders use) sees what ``pip install enginetime`` would give.
    """
    project = _pyproject()
    setuptools_cfg = project.get("tool", {}).get("setuptools", {})
    package_dir: dict[str, str] = setuptools_cfg.get("package-dir", {})
    packages: list[str] = setuptools_cfg.get("packages", [])
    dest.mkdir(parents=True, exist_ok=True)
    for pkg in sorted(packages, key=lambda p: p.count(".")):
        if pkg in package_dir:
            src = REPO / package_dir[pkg]
        else:  # a subpackage without its own mapping lies inside its parent's folder
            parent, _, leaf = pkg.rpartition(".")
            src = REPO / package_dir.get(parent, parent.replace(".", "/")) / leaf
        target = dest.joinpath(*pkg.split("."))
        if pkg == "enginetime":
            target.mkdir(parents=True, exist_ok=True)
            for item in src.iterdir():  # link the root package's modules one by one
                link = target / item.name
                if not link.exists() and item.name != "__pycache__":
                    link.symlink_to(item)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(src, target_is_directory=True)
    version = project["project"]["version"]
    info = dest / f"enginetime-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: enginetime\nVersion: {version}\n")
    lines: list[str] = []
    for group, eps in project["project"].get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {value}" for name, value in eps.items())
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return dest


def engine_subprocess_env(shim_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for running engine code: our shim importable, offline, CPU, quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))}
    env.update(
        PYTHONPATH=str(shim_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONDONTWRITEBYTECODE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    env.update(extra)
    return env


if __name__ == "__main__":
    keys = sys.argv[1:] or list(RECIPES)
    for k in keys:
        e = ensure(k)
        how = f"built in {e.build_seconds:.0f} s" if e.build_seconds else "cached"
        print(f"{k}: {e.path} ({how})", flush=True)


# ---------------------------------------------------------------------------
# running engine code and capturing what our hooks sent


class IngestSink:
    """A Unix-socket listener standing in for the sidecar: keeps every byte per connection.

    ``frames()`` decodes them with the sidecar's own decoder (the real wire path), so
    a test checks exactly what a sidecar would receive.
    """

    def __init__(self, directory: str) -> None:
        import socket
        import threading

        self.path = os.path.join(directory, "ingest.sock")
        self.address = f"unix:{self.path}"
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(self.path)
        self._srv.listen(16)
        self._srv.settimeout(0.05)  # the accept loop polls its stop flag
        self.connections: list[bytearray] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._accept = threading.Thread(target=self._accept_loop, name="ingest-sink", daemon=True)
        self._accept.start()

    def _accept_one(self) -> bool:
        import threading

        try:
            conn, _ = self._srv.accept()
        except TimeoutError:
            return False
        conn.settimeout(None)
        buf = bytearray()
        self.connections.append(buf)
        t = threading.Thread(target=self._read, args=(conn, buf), daemon=True)
        t.start()
        self._threads.append(t)
        return True

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._accept_one()
            except OSError:
                return

    @staticmethod
    def _read(conn, buf: bytearray) -> None:  # noqa: ANN001
        with conn:
            while True:
                try:
                    chunk = conn.recv(1 << 16)
                except OSError:
                    return
                if not chunk:
                    return
                buf.extend(chunk)

    def close(self) -> None:
        """Stop listening; every connection already made is read to its end first."""
        self._stop.set()
        self._accept.join(5.0)
        try:
            while self._accept_one():  # connections still waiting in the backlog
                pass
        except OSError:
            pass
        self._srv.close()
        for t in list(self._threads):
            t.join(5.0)

    def frames(self) -> list[list]:
        """Decoded frames, one list per connection (hello first)."""
        from enginetime.sidecar.ingest.frames import FrameDecoder

        out = []
        for buf in self.connections:
            dec = FrameDecoder()
            out.append(dec.feed(bytes(buf)))
        return out


def run_engine_script(
    env: EngineEnv,
    script: Path,
    args: list[str],
    *,
    shim_dir: Path,
    extra_env: dict[str, str] | None = None,
    timeout: float = 240.0,
) -> dict:
    """Run ``script`` with the engine venv's python; return the JSON of its last stdout line.

    Fails (AssertionError with the engine's stderr tail) when the script does.
    """
    env_vars = engine_subprocess_env(shim_dir, **(extra_env or {}))
    proc = subprocess.run(
        [str(env.python), str(script), *args],
        capture_output=True,
        text=True,
        env=env_vars,
        timeout=timeout,
        cwd=str(shim_dir),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"{env.recipe.engine} {env.recipe.version}: {script.name} {' '.join(args)} failed "
            f"(exit {proc.returncode}).\nstdout tail:\n{proc.stdout[-2000:]}\n"
            f"stderr tail:\n{proc.stderr[-5000:]}"
        )
    result = json.loads(lines[-1])
    result["_stderr"] = proc.stderr
    return result
