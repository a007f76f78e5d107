"""Entry points of train.py and evaluate.py: Hydra parses overrides, zoo.run works, mistakes end in one line.

Only Hydra is imported up front, so `python train.py --help` answers without loading torch.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def train_main() -> None:
    _hydra_main("train", lambda cfg: __import__("zoo.run", fromlist=["train"]).train(cfg))


def evaluate_main() -> None:
    _hydra_main("eval", lambda cfg: __import__("zoo.run", fromlist=["evaluate"]).evaluate(cfg))


def _hydra_main(config_name: str, work: Callable[[Any], Any]) -> None:
    import hydra

    from zoo import run_folder

    args = [expand_home_and_variables(a) for a in sys.argv[1:]]
    if args[:1] == ["--help"]:
        with _one_line_errors():
            check_overrides(config_name, args[1:])
            print(help_text(config_name, args[1:]))
        return
    with _one_line_errors():
        check_overrides(config_name, args)
        # the run folder is made here, atomically, so that Hydra never writes into another run's folder;
        # Hydra names the job after this file, the one holding the function it wraps
        claim = run_folder.claim(CONFIG_DIR, config_name, args, job_name=Path(__file__).stem)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def main(cfg: Any) -> Any:
        with _one_line_errors():
            return work(cfg)

    sys.argv = [sys.argv[0], *claim.args]  # Hydra, and Lightning's DDP child processes, read the command line
    with claim.removed_on_failure():
        main()


def expand_home_and_variables(arg: str) -> str:
    """`data.path=~/data/ml-100k` or `data.path=$DATA/ml-100k` as a shell would expand them: Hydra's override
    grammar rejects a value that starts with `~`, and keeps `$NAME` as text."""
    key, equals, value = arg.partition("=")
    if not equals or key.startswith("-") or not (value.startswith("~") or "$" in value.replace("${", "")):
        return arg
    expanded = os.path.expandvars(os.path.expanduser(value)) if "${" not in value else os.path.expanduser(value)
    return f"{key}={expanded}"


def help_text(config_name: str, overrides: list[str]) -> str:
    """What `--help` prints: Hydra's layout (header, groups, config, footer), built from the config folders.

    Hydra lists the options of each group by copying its whole config repository once per group, which takes
    most of a second with this many configs; the groups here are plain folders of YAML files.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    texts = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "hydra" / "default.yaml").help)  # unresolved
    name = str(texts["app_name"])
    groups = sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    listing = [f"{g.name}: {', '.join(sorted(f.stem for f in g.glob('*.yaml')))}" for g in groups]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    return "\n".join(
        [
            str(texts["header"]).replace("${hydra.help.app_name}", name),
            "== Configuration groups ==",
            "Compose your configuration from those groups (group=option)\n",
            *listing,
            "\n== Config ==",
            "Override anything in the config (foo.bar=value)\n",
            OmegaConf.to_yaml(cfg),
            str(texts["footer"]),
        ]
    )


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Report mistakes in the user's input as `error: ...` and exit 2; HYDRA_FULL_ERROR=1 shows the traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from zoo.errors import UserError

    try:
        yield
    except (UserError, HydraException, OmegaConfBaseException) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {describe(error)}", file=sys.stderr)
        sys.exit(2)


def describe(error: BaseException) -> str:
    """One line: the innermost message, prefixed by the config key Hydra was instantiating when it failed."""
    from hydra.errors import InstantiationException

    key = ""
    while isinstance(error, InstantiationException):
        # Hydra's message reads "Error in call to target 'x':\nValueError(...)\nfull_key: model.net"
        found = [line.split(":", 1)[1].strip() for line in str(error).splitlines() if line.startswith("full_key:")]
        key = found[0] if found else key
        if error.__cause__ is None:
            break
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, InstantiationException):
        lines = [line for line in lines if not line.startswith("full_key:")]
    text = " ".join(lines) or type(error).__name__
    # "scheduler: ..." or "model.generator.image_shape: ..." already names a full key; "norm: ..." needs its place
    leading = re.match(r"([\w.]+): ", text)
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    names_a_full_key = leading is not None and leading.group(1).split(".")[0] in groups
    return f"{key}: {text}" if key and not names_a_full_key and not text.startswith(key.rsplit(".", 1)[-1]) else text


def check_overrides(config_name: str, args: list[str]) -> None:
    """Validate the command line before Hydra creates a run folder, with one-line messages.

    Group choices (model=..., data=...) are checked against the files in configs/, sweep values
    included; a single run is composed in full so that a mistyped key is caught with a suggestion.
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return  # --help, --cfg, -cp ...: Hydra's own modes, and Lightning's DDP child processes
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if "hydra/launcher=submitit_slurm" in overrides and shutil.which("sbatch") is None:
        raise _user_error(
            "hydra/launcher=submitit_slurm: no SLURM on this machine (sbatch not found); run from a cluster's login "
            "node, or use hydra/launcher=joblib or submitit_local here"
        )
    from zoo.search import prepare_storage, storage_override

    storage = storage_override(overrides)
    if storage is not None:  # several sweeper processes may start at once: the study's tables are made here first
        prepare_storage(storage)
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        group_dir = CONFIG_DIR / key
        if key.startswith("hydra") or not group_dir.is_dir() or not value:
            continue
        options = sorted(p.stem for p in group_dir.glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options and choice != "null":
                raise _user_error(f"{key}: no config '{choice}'; allowed: {', '.join(options)}")
    if overrides and "-m" not in args and "--multirun" not in args:
        _compose(config_name, overrides)
    # an existing hydra.run.dir or hydra.sweep.dir is refused by zoo.run_folder.claim, which creates the folder


def _compose(config_name: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=job_overrides)
            _check_value_kinds(config_name, job_overrides, cfg)
    except OverrideParseException as error:
        raise _user_error(f"cannot parse override: {describe(error)}") from error
    except MissingConfigException as error:
        raise _user_error(describe(error)) from error
    except ConfigCompositionException as error:
        cause = error.__cause__
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
            raise _user_error(_unknown_key_message(config_name, str(cause.full_key), job_overrides)) from error
        if cause is not None:  # e.g. a list key given a number: name the key, then OmegaConf's reason
            first_line = str(error).splitlines()[0].removeprefix("Could not override ").rstrip(".")
            raise _user_error(f"{first_line}: {str(cause).splitlines()[0]}") from error
        raise _user_error(describe(error)) from error


# keys whose default is a number or a flag but which also take a word
WORDS_FOR_NUMBERS = {
    "trainer.devices": ("auto",),
    "trainer.deterministic": ("warn",),
    "model.ccp_alpha": ("auto",),  # a decision tree's pruning chosen by inner CV
}


def _check_value_kinds(config_name: str, overrides: list[str], cfg: Any) -> None:
    """A `key=value` whose default is a number or a flag must stay one: `trainer.max_epochs=abc` is refused here,
    in one line naming the key, rather than deep inside the trainer as a comparison of int and str."""
    from hydra import compose
    from omegaconf import OmegaConf

    plain = [o for o in overrides if o[:1] not in "+~" and "=" in o and not (CONFIG_DIR / o.split("=")[0]).is_dir()]
    if not plain:
        return
    defaults = compose(config_name, overrides=[o for o in overrides if o not in plain])
    for override in plain:
        key = override.split("=", 1)[0]
        default = OmegaConf.select(defaults, key, default=None, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if not isinstance(value, str) or value in WORDS_FOR_NUMBERS.get(key, ()):
            continue
        if isinstance(default, bool):
            raise _user_error(f"{key}: expected true or false, got {value!r}")
        if isinstance(default, (int, float)):
            raise _user_error(
                f"{key}: expected {'an integer' if isinstance(default, int) else 'a number'}, got {value!r}"
            )


def _unknown_key_message(config_name: str, full_key: str, overrides: list[str]) -> str:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    parent, _, leaf = full_key.rpartition(".")
    others = [o for o in overrides if not o.lstrip("+~").startswith(full_key + "=")]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=others)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [str(k) for k in node] if OmegaConf.is_dict(node) else []
    if leaf in keys:  # the key exists: the value was of the wrong kind (a number for a list, say)
        current = OmegaConf.to_container(node[leaf]) if OmegaConf.is_config(node[leaf]) else node[leaf]
        return f"{full_key}: the value does not fit this key; its default is {current!r}"
    close = difflib.get_close_matches(leaf, keys, n=3)
    hint = (
        f"did you mean {', '.join((parent + '.' if parent else '') + k for k in close)}?"
        if close
        else (f"keys there: {', '.join(keys)}" if keys else "")
    )
    return f"{full_key}: no such config key; {hint} (add a new key with +{full_key}=...)".replace("; (", " (")


def _user_error(message: str) -> Exception:
    from zoo.errors import UserError

    return UserError(message)
