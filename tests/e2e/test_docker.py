"""The container images (docker/): both Dockerfiles lint clean, their pins agree with pyproject.toml
and the Makefile, and the CPU image is built for real (podman, FROM a debootstrapped Debian) and
trains two steps through docker/run-cpu-image.sh."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.conftest import ROOT, cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]


def hadolint(*paths: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is missing: it is in the dev extra (pip install -e '.[dev]', or make install)"
    return subprocess.run([exe, "--no-color", *map(str, paths)], capture_output=True, text=True, timeout=60)


def test_dockerfiles_lint_clean():
    r = hadolint(*DOCKERFILES)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_hadolint_really_lints(tmp_path):
    """The clean result above means something: the same linter flags a careless Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    r = hadolint(bad)
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3008" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_says_why(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], \
                f"{path.name}:{i + 1}: put a comment saying why right above `{line}`"


# -- pins ------------------------------------------------------------------------------------------

def dockerfile_arg(text: str, name: str) -> str:
    """The default of `ARG NAME=value` (exactly one, so no second definition can shadow it)."""
    found = re.findall(rf"^ARG {name}=(\S+)[ \t]*$", text, re.M)
    if len(found) != 1:
        raise ValueError(f"expected one `ARG {name}=...` line, found {len(found)}")
    return found[0]


def pin_problems(cpu: str, cuda: str, makefile: str, pyproject: dict) -> list[str]:
    """Where the images' pins disagree with the Makefile and pyproject.toml (empty: they agree)."""
    problems = []
    m = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)\s*$", makefile, re.M)
    if not m:
        return ["no `TORCH_SPEC ?= ...` in the Makefile"]
    make_torch = Requirement(m.group(1))
    pinned = [s.version for s in make_torch.specifier if s.operator == "=="]
    if make_torch.name != "torch" or len(pinned) != 1:
        return [f"the Makefile's TORCH_SPEC={m.group(1)} is not one torch==X pin"]
    cpu_torch = dockerfile_arg(cpu, "TORCH_VERSION")
    if Version(cpu_torch) != Version(pinned[0]):
        problems.append(f"Dockerfile.cpu installs torch {cpu_torch}, "
                        f"the Makefile's TORCH_SPEC is {m.group(1)}")

    deps = [Requirement(d) for d in pyproject["project"]["dependencies"]]
    floor = next(d.specifier for d in deps if d.name == "torch")
    cuda_torch = dockerfile_arg(cuda, "TORCH_VERSION")
    if not floor.contains(cuda_torch):
        problems.append(f"Dockerfile installs torch {cuda_torch}, outside pyproject's torch{floor}")

    # The CUDA wheel index and the CUDA base image name the same CUDA release (cu126 <-> 12.6.x).
    wheel_cuda = re.search(r"/whl/cu(\d+)(\d)\b", dockerfile_arg(cuda, "TORCH_INDEX_URL"))
    base_cuda = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.", cuda, re.M)
    if not (wheel_cuda and base_cuda and wheel_cuda.groups() == base_cuda.groups()):
        problems.append("Dockerfile: the torch wheel index (cuXYZ) and the nvidia/cuda base are "
                        "different CUDAs")

    requires_python = SpecifierSet(pyproject["project"]["requires-python"])
    for name, text in (("Dockerfile.cpu", cpu), ("Dockerfile", cuda)):
        python = dockerfile_arg(text, "PYTHON_VERSION")
        if not requires_python.contains(python):
            problems.append(f"{name} installs Python {python}, outside requires-python {requires_python}")
    return problems


@pytest.fixture(scope="module")
def sources() -> dict:
    return {"cpu": (DOCKER / "Dockerfile.cpu").read_text(), "cuda": (DOCKER / "Dockerfile").read_text(),
            "makefile": (ROOT / "Makefile").read_text(),
            "pyproject": tomllib.loads((ROOT / "pyproject.toml").read_text())}


def test_image_pins_agree_with_pyproject_and_makefile(sources):
    assert pin_problems(**sources) == []


def set_arg(text: str, name: str, value: str) -> str:
    out, n = re.subn(rf"^ARG {name}=\S+", f"ARG {name}={value}", text, flags=re.M)
    assert n == 1
    return out


def with_requires_python(pyproject: dict, spec: str) -> dict:
    return {**pyproject, "project": {**pyproject["project"], "requires-python": spec}}


CU130 = "https://download.pytorch.org/whl/cu130"


@pytest.mark.parametrize("change, expected", [
    (lambda s: {"cpu": set_arg(s["cpu"], "TORCH_VERSION", "2.12.0")}, "Dockerfile.cpu installs torch 2.12.0"),
    (lambda s: {"makefile": re.sub(r"(?m)^TORCH_SPEC.*$", "TORCH_SPEC ?= torch==9.0.0", s["makefile"])},
     "TORCH_SPEC is torch==9.0.0"),
    (lambda s: {"cuda": set_arg(s["cuda"], "TORCH_VERSION", "2.3.1")}, "outside pyproject's torch>="),
    (lambda s: {"cuda": set_arg(s["cuda"], "TORCH_INDEX_URL", CU130)}, "different CUDAs"),
    (lambda s: {"cpu": set_arg(s["cpu"], "PYTHON_VERSION", "3.9")}, "Dockerfile.cpu installs Python 3.9"),
    (lambda s: {"pyproject": with_requires_python(s["pyproject"], ">=3.13")},
     "outside requires-python >=3.13"),
], ids=["cpu-torch", "makefile-torch", "cuda-torch-floor", "cuda-index", "python", "requires-python"])
def test_pin_check_catches_drift(sources, change, expected):
    """The check can fail: each single edit that breaks agreement is reported."""
    problems = pin_problems(**{**sources, **change(sources)})
    assert any(expected in p for p in problems), problems


def test_pin_check_needs_the_args(sources):
    with pytest.raises(ValueError, match="ARG TORCH_VERSION"):
        pin_problems(**{**sources, "cpu": sources["cpu"].replace("ARG TORCH_VERSION=", "ARG TORCH=")})


# -- the CPU image, built and run --------------------------------------------------------------------

@pytest.mark.slow
def test_cpu_image_builds_and_trains_two_steps(tmp_path):
    if os.geteuid() != 0:
        missing = [t for t in ("podman", "debootstrap") if shutil.which(t) is None]
        pytest.skip("building the CPU image needs root (debootstrap, mount, chroot)"
                    + (f"; missing here: {', '.join(missing)}" if missing else ""))
    image = "megatron-lite:cpu"
    build = subprocess.run([str(DOCKER / "build-cpu-image.sh")], env=dict(os.environ, IMAGE=image),
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stderr[-4000:]
    assert re.fullmatch(r"[0-9a-f]{64}", build.stdout.strip().splitlines()[-1]), build.stdout

    def run(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([str(DOCKER / "run-cpu-image.sh"), "--image", image, "-v", f"{tmp_path}:/out",
                            "-e", "OMP_NUM_THREADS=1", *args], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    # The image holds what its Dockerfile says (not just the text): the pinned torch on that Python.
    versions = run("--entrypoint", "python", "--", "-c",
                   "import sys, torch; print('%d.%d' % sys.version_info[:2], torch.__version__)")
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert versions.stdout.split() == [dockerfile_arg(cpu, "PYTHON_VERSION"),
                                       f"{dockerfile_arg(cpu, 'TORCH_VERSION')}+cpu"], versions.stdout

    # The embedded corpus is the image's own Python standard library; configs/ ships in the image.
    run("--", "prepare-data", "--source", "stdlib", "--out", "/out/data", "--vocab-size", "512",
        "--max-bytes", "400000")
    r = run("--", "train", "--config", "configs/tiny.yaml", "data.dir=/out/data", "train.out_dir=/out/run",
            "model.vocab_size=512", "train.steps=2", "optim.warmup_steps=1", "train.eval_interval=2",
            "train.eval_iters=1", "train.progress=false", "train.sample_tokens=0", "train.device=cpu",
            "checkpoint.interval=2", "log.interval=1")
    out = r.stdout + r.stderr
    assert "device cpu" in out and re.search(r"step\s+2 \| loss [\d.]+", out), out
    assert "stopping at step 2: reached train.steps=2" in out, out
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2], metrics
    # The checkpoint the image wrote is whole: the host's megatron-lite verifies every checksum.
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    v = cli("checkpoint", "verify", str(tmp_path / "run"))
    assert v.returncode == 0, v.stdout + v.stderr
