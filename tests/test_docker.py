"""docker/Dockerfile and README's Docker commands, checked without Docker: a small Dockerfile parser, the
image's weight bake step run on fake weight files (no network), and the README's `docker run` commands
parsed the way the container would parse them."""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import torch
from packaging.requirements import Requirement

from losses.lpips import LAYER_CHANNELS, LPIPS
from losses.perceptual import VGG19Features
from losses.vgg import VGG16_FILENAME, VGG19_FILENAME, vgg16_features, vgg19_features

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
BAKE_SCRIPT = "launch/bake_weights.py"
FIRST_PARTY = {"models", "losses", "data", "trainer", "launch"}
# Values that the README's commands leave to the user's shell.
SHELL_VARIABLES = {"PWD": "/home/user/video-vae-trainer", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}
# `docker run` options that take a value (the image is the first word that is neither an option nor a value).
DOCKER_RUN_VALUE_OPTIONS = {
    "-v", "--volume", "-e", "--env", "--ulimit", "--shm-size", "--network", "--net", "--ipc", "--entrypoint",
    "--name", "--gpus", "-w", "--workdir", "--device", "--user", "-u", "--mount", "--cap-add", "--stop-timeout",
}  # fmt: skip
# PID 1: tini, forwarding SIGTERM to the whole process group (`docker stop` reaches the ranks, which save)
INIT = ["tini", "-g", "--"]
DOCKER_RUN_FLAGS = {"--rm", "-it", "-i", "-t", "-d", "--privileged", "--init"}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the instruction, continuation lines joined
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (`CMD ["a", "b"]`), else None."""
        if not self.args.startswith("["):
            return None
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with `\\` continuations joined; comment lines (also inside a continuation, which
    Docker drops) and parser directives skipped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        keyword, _, rest = " ".join([*pending, stripped]).partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def substitute(text: str, variables: dict[str, str]) -> str:
    """Expand `$NAME` / `${NAME}`; an unknown name is a test failure (a value the test does not know)."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"unknown variable ${name} in {text!r}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def env_assignments(instruction: Instruction) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(instruction.args))


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def train_module():
    spec = importlib.util.spec_from_file_location(
        "launch_train_for_docker_test", REPO / "launch" / "train.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bake_module():
    spec = importlib.util.spec_from_file_location("launch_bake_weights_for_test", REPO / BAKE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def base_image(instructions: list[Instruction]) -> str:
    """FROM's image with the ARG defaults declared before it substituted."""
    args = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            return substitute(instruction.args.split()[0], args)
        assert instruction.keyword == "ARG", f"only ARG may precede FROM, got {instruction}"
        name, _, default = instruction.args.partition("=")
        args[name] = default
    raise AssertionError("no FROM")


def workdir(instructions: list[Instruction]) -> PurePosixPath:
    return PurePosixPath(only(instructions, "WORKDIR").args)


def bake_run(instructions: list[Instruction]) -> Instruction:
    found = [i for i in instructions if i.keyword == "RUN" and BAKE_SCRIPT in i.args]
    assert len(found) == 1, f"expected one RUN of {BAKE_SCRIPT}"
    return found[0]


def copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
    return words[:-1], words[-1]


def setup_requirements() -> list[Requirement]:
    """setup.py's install_requires, read without running setup.py."""
    for node in ast.walk(ast.parse((REPO / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [Requirement(r) for r in ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no install_requires")


# --- the Dockerfile ----------------------------------------------------------------------------------------


def test_parser_joins_continuations_and_reads_exec_form():
    text = '# syntax=docker/dockerfile:1\nFROM a:1\nRUN x \\\n    # dropped\n    && y\nCMD ["--config", "c.json"]\n'
    parsed = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("FROM", "a:1", 2),
        ("RUN", "x && y", 3),
        ("CMD", '["--config", "c.json"]', 6),
    ]
    assert parsed[2].exec_form() == ["--config", "c.json"] and parsed[1].exec_form() is None


def test_base_image_is_a_pinned_cuda_pytorch_devel_image_whose_torch_setup_accepts(dockerfile):
    image = base_image(dockerfile)
    assert only(dockerfile, "FROM")  # one stage: the ENV and bake step below are in the final image
    repository, _, tag = image.partition(":")
    assert repository == "pytorch/pytorch", image
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-devel", tag)
    assert match, f"{image}: want an exact <torch>-cuda<x.y>-cudnn<n>-devel tag (devel: DeepSpeed JIT ops)"
    # pip keeps the image's CUDA torch only if setup.py's requirement already holds for it.
    (torch_requirement,) = [r for r in setup_requirements() if r.name == "torch"]
    assert torch_requirement.specifier.contains(match.group(1)), (torch_requirement, image)


def test_project_is_installed_with_pip_holding_the_base_images_torch(dockerfile):
    runs = [i.args for i in dockerfile if i.keyword == "RUN"]
    installs = [part.strip() for run in runs for part in run.split("&&") if "pip install" in part]
    assert installs
    writes_constraints = [run for run in runs if "torch==" in run and "m.version('torch')" in run]
    assert writes_constraints, "the installed torch's version is not written into a constraints file"
    constraints = re.search(r"> (\S+)", writes_constraints[0]).group(1)
    for install in installs:
        words = shlex.split(install)
        assert words[words.index("-c") + 1] == constraints, install
        assert not {"torch", "-U", "--upgrade", "--force-reinstall"} & set(words), install
    # The last install is of the whole project, after everything is copied.
    full_copy = max(
        n for n, i in enumerate(dockerfile) if i.keyword == "COPY" and copy_sources(i)[0] == ["."]
    )
    last_install = max(n for n, i in enumerate(dockerfile) if "pip install" in i.args)
    assert last_install > full_copy and shlex.split(installs[-1].split("&&")[0])[-1] == "."


def test_every_copied_path_exists_and_is_not_dockerignored(dockerfile):
    patterns = [
        line.strip().lstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
            for pattern in patterns
            for prefix in prefixes
        ) or any(
            fnmatch.fnmatch(part, p.removeprefix("**/")) for p in patterns if "**" in p for part in parts
        )

    needed = []
    for instruction in dockerfile:
        if instruction.keyword in ("COPY", "ADD"):
            assert instruction.keyword == "COPY" and "--from" not in instruction.args, instruction
            sources, _ = copy_sources(instruction)
            for source in sources:
                assert (REPO / source).exists(), f"line {instruction.line}: {source} is not in the repository"
                if source != ".":
                    needed.append(source.rstrip("/"))
    # What `COPY . .` must bring: the entry point, the configs, and the packages setup.py installs.
    needed += ["launch/train.py", "configs/cogvideo_vae.json", "models", "losses", "data", "trainer"]
    assert not [path for path in needed if ignored(path)]
    assert ignored(".git") and ignored("runs/x/checkpoints") and ignored("losses/__pycache__")


def test_entrypoint_runs_deepspeed_launch_train_and_cmd_is_a_valid_run(dockerfile, train_module):
    assert only(dockerfile, "ENTRYPOINT").exec_form() == [*INIT, "deepspeed", "launch/train.py"]
    # tini comes from the image's apt-get install
    installs = [i for i in dockerfile if i.keyword == "RUN" and "apt-get install" in i.args]
    assert len(installs) == 1 and "tini" in shlex.split(installs[0].args)
    assert (REPO / "launch" / "train.py").is_file()  # at WORKDIR/launch/train.py after `COPY . .`
    cmd = only(dockerfile, "CMD").exec_form()
    assert cmd is not None
    args = train_module.parse_args(cmd)
    from trainer.config import load_config

    load_config(REPO / args.config, args.overrides)


def test_bake_step_runs_the_project_code_into_the_folder_the_environment_names(
    dockerfile, bake_module, monkeypatch
):
    bake = bake_run(dockerfile)
    assert shlex.split(bake.args)[:2] == ["python", BAKE_SCRIPT]
    env_lines = [(n, env_assignments(i)) for n, i in enumerate(dockerfile) if i.keyword == "ENV"]
    torch_homes = [(n, env["TORCH_HOME"]) for n, env in env_lines if "TORCH_HOME" in env]
    assert len(torch_homes) == 1, "TORCH_HOME is set once, before the bake step, for build and jobs alike"
    position, torch_home = torch_homes[0]
    assert position < dockerfile.index(bake)
    # The script writes where the losses read: <torch.hub.get_dir()>/checkpoints, from TORCH_HOME.
    monkeypatch.setenv("TORCH_HOME", torch_home)
    assert bake_module.checkpoint_dir() == Path(torch_home) / "hub" / "checkpoints"
    assert Path(torch.hub.get_dir()) / "checkpoints" == bake_module.checkpoint_dir()


def test_files_copied_before_the_bake_step_import_no_other_first_party_code(dockerfile):
    bake = bake_run(dockerfile)
    files = []
    for instruction in dockerfile[: dockerfile.index(bake)]:
        if instruction.keyword == "COPY":
            for source in copy_sources(instruction)[0]:
                path = REPO / source
                files += (
                    sorted(path.rglob("*.py")) if path.is_dir() else [path] if source.endswith(".py") else []
                )
    copied = {f.relative_to(REPO).parts[0] for f in files}
    imported = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
    assert not (imported & FIRST_PARTY) - copied, "the bake layer needs code it does not copy"


# --- the bake script on fake weights -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory) -> dict[str, Path]:
    """Random weights in torchvision's and lpips' file layouts (classifier entries included, as theirs)."""
    folder = tmp_path_factory.mktemp("fake_weights")
    generator = torch.Generator().manual_seed(0)
    vgg16 = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    vgg19 = {f"features.{k}": v for k, v in vgg19_features().state_dict().items()}
    heads = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) / c
        for i, c in enumerate(LAYER_CHANNELS)
    }
    files = {"vgg16": folder / "vgg16.pth", "heads": folder / "vgg.pth", "vgg19": folder / "vgg19.pth"}
    torch.save({**vgg16, "classifier.0.weight": torch.zeros(4, 4)}, files["vgg16"])
    torch.save(heads, files["heads"])
    torch.save({**vgg19, "classifier.0.weight": torch.zeros(4, 4)}, files["vgg19"])
    return files


def test_bake_step_on_fake_weights_fills_the_cache_the_losses_load_with_the_recipes_config(
    dockerfile, fake_weights, tmp_path, monkeypatch
):
    # The build context of the bake layer: only what the Dockerfile copies before it.
    bake = bake_run(dockerfile)
    context = tmp_path / "workspace"
    for instruction in dockerfile[: dockerfile.index(bake)]:
        if instruction.keyword == "COPY":
            sources, destination = copy_sources(instruction)
            for source in sources:
                target = context / destination
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / source, target / Path(source).name)
    torch_home = tmp_path / "torch_home"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # An unreachable proxy: any attempt to download fails at once instead of reaching the network.
    env.update(TORCH_HOME=str(torch_home), HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    command = [sys.executable, *shlex.split(bake.args)[1:]]
    command += ["--vgg16", str(fake_weights["vgg16"]), "--lpips-heads", str(fake_weights["heads"])]
    command += ["--vgg19", str(fake_weights["vgg19"])]
    result = subprocess.run(command, cwd=context, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "is not torchvision's" in result.stderr  # fake files under hash-carrying names are flagged
    checkpoints = torch_home / "hub" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        [VGG16_FILENAME, "lpips_vgg_v0.1.pth", VGG19_FILENAME]
    )

    # A job: the recipe's LPIPS settings (no weights path), the image's TORCH_HOME, and no network.
    from trainer.config import load_config

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    lpips_config = load_config(REPO / "configs" / "cogvideo_vae.json").loss.lpips
    lpips = LPIPS(
        pretrained=lpips_config.pretrained,
        weights_path=lpips_config.weights_path,
        backbone_weights_path=lpips_config.backbone_weights_path,
        download=lpips_config.download,
    )
    original_vgg16 = torch.load(fake_weights["vgg16"], weights_only=True)
    original_heads = torch.load(fake_weights["heads"], weights_only=True)
    torch.testing.assert_close(lpips.features[28].weight, original_vgg16["features.28.weight"])
    torch.testing.assert_close(lpips.lin4.model[1].weight, original_heads["lin4.model.1.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.isfinite(lpips(x, x.flip(0))).all()
    vgg19 = VGG19Features(download=True)
    original_vgg19 = torch.load(fake_weights["vgg19"], weights_only=True)
    torch.testing.assert_close(vgg19.features[0].weight, original_vgg19["features.0.weight"])


def test_bake_script_reports_a_missing_local_file(bake_module, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert bake_module.main(["--vgg16", str(tmp_path / "absent.pth")]) == 1
    assert "absent.pth does not exist" in capsys.readouterr().err


# --- README ------------------------------------------------------------------------------------------------


def readme_docker_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Docker\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Docker' section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S):
        for command in re.sub(r"\\\n", " ", block).splitlines():
            if command.strip().startswith("docker "):
                commands.append(shlex.split(substitute(command, SHELL_VARIABLES)))
    return commands


def split_docker_run(words: list[str]) -> tuple[dict[str, list[str]], str, list[str]]:
    """`docker run OPTIONS IMAGE ARGS` -> ({option: [values]}, image, args)."""
    assert words[:2] == ["docker", "run"], words
    options: dict[str, list[str]] = {}
    index = 2
    while words[index].startswith("-"):
        name, equals, value = words[index].partition("=")
        if name in DOCKER_RUN_FLAGS and not equals:
            options.setdefault(name, [])
            index += 1
            continue
        assert name in DOCKER_RUN_VALUE_OPTIONS, (
            f"unknown docker run option {name}: add it to the test's lists"
        )
        if not equals:
            index += 1
            value = words[index]
        options.setdefault(name, []).append(value)
        index += 1
    return options, words[index], words[index + 1 :]


def test_readme_docker_commands_match_the_image(dockerfile, train_module):
    import deepspeed.launcher.runner

    from trainer.config import load_config

    section = (REPO / "README.md").read_text().partition("## Docker")[2].partition("\n## ")[0]
    assert set(re.findall(r"pytorch/pytorch:[\w.-]+", section)) <= {base_image(dockerfile)}
    commands = readme_docker_commands()
    builds = [c for c in commands if c[:2] == ["docker", "build"]]
    runs = [c for c in commands if c[:2] == ["docker", "run"]]
    assert len(builds) == 1 and len(runs) >= 2, commands
    build = builds[0]
    assert build[build.index("-f") + 1] == str(DOCKERFILE.relative_to(REPO)) and build[-1] == "."
    image = build[build.index("-t") + 1]
    assert ":" in image and not image.endswith(":latest"), image
    assert f"-t {image}" in DOCKERFILE.read_text(), "the Dockerfile's header shows another image name"
    root = workdir(dockerfile)
    entrypoint = only(dockerfile, "ENTRYPOINT").exec_form()
    multi_node = 0
    for run in runs:
        options, run_image, args = split_docker_run(run)
        assert run_image == image
        assert options.get("--gpus") == ["all"] and "--ipc" in options
        mounts = {PurePosixPath(v.split(":")[1]) for v in options.get("-v", [])}
        # Mounts inside WORKDIR hold runs only: one on the code would hide what the image installed.
        assert all(m == root / "runs" for m in mounts if m.is_relative_to(root)), mounts
        launched = [*options["--entrypoint"], *args] if "--entrypoint" in options else [*entrypoint, *args]
        assert launched[: len(INIT)] == INIT, f"docker stop would not reach the ranks: {launched}"
        launched = launched[len(INIT) :]
        assert launched[0] == "deepspeed", launched
        # time for the ranks to save a checkpoint when stopped (Docker's default: 10 s)
        assert int(options.get("--stop-timeout", ["10"])[0]) >= 30, run
        launcher = deepspeed.launcher.runner.parse_args(launched[1:])
        assert launcher.user_script == "launch/train.py", launched
        train_args = train_module.parse_args(launcher.user_args)
        # The config path is relative to WORKDIR, where `COPY . .` put the repository.
        config = load_config(REPO / train_args.config, train_args.overrides)
        # What the run writes and reads lies on mounted storage: the container's disk goes with it.
        needed = [root / config.train.output_dir]
        shards = config.data.shards if isinstance(config.data.shards, list) else [config.data.shards]
        needed += [PurePosixPath(s) for s in shards if s.startswith("/")]
        if "--hostfile" in launched:  # (deepspeed's default hostfile is /job/hostfile, used when present)
            multi_node += 1
            needed.append(PurePosixPath(launcher.hostfile))
            assert options.get("--network") == ["host"], "NCCL between nodes needs host networking"
            assert launcher.no_ssh and launcher.node_rank >= 0 and launcher.master_addr, launched
        for path in needed:
            assert any(path.is_relative_to(m) for m in mounts), f"{path} is not on a mount ({mounts})"
    assert multi_node >= 1, "the README shows no multi-node command"
