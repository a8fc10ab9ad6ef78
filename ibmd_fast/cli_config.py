"""The training commands' options, built from their config dataclasses (one source for defaults):
dataclass < ``--config FILE`` (YAML/JSON) < options given on the command line; ``--dry-run``
prints the resolved config. Used by ``ibmd_fast.cli`` when it builds train-teacher and distill."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Optional

import click
from click.core import ParameterSource

from ibmd_fast.cli_errors import FiniteFloat, _check_output_parent, seed_option_type
from ibmd_fast.config_io import ConfigError, dump_config, load_config_file, resolve_config

# ----------------------------------------------------------------------------
# Config dataclasses -> options


def _default(cls, name: str):
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            return None
    raise KeyError(f"{cls.__name__} has no field {name!r}")


class IntList(click.ParamType):
    """Comma-separated positive integers ("1,10,100"), or a list of them; gives a tuple."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            items = [value]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [v for v in str(value).replace(" ", "").split(",") if v]
        try:
            numbers = tuple(int(v) for v in items)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not numbers or min(numbers) < 1:
            self.fail(f"{value!r}: give one or more integers >= 1", param, ctx)
        return numbers


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


# Option specs: field name -> (click.option keyword arguments). Flags use "flag": "--x/--no-x".
_SHARED_TRAIN_OPTIONS: list[tuple[str, dict]] = [
    ("batch_size", dict(type=click.IntRange(min=1), metavar="N", help="Images per training step.")),
    ("ema_decay", dict(type=FiniteFloat(0.0, 1.0), metavar="FLOAT", help="EMA decay of the released weights.")),
    ("grad_clip", dict(type=FiniteFloat(min=0.0), metavar="NORM", help="Gradient-norm clip; 0 turns it off.")),
    ("precision", dict(type=click.Choice(["fp32", "bf16", "fp16"]), help="Arithmetic precision (autocast).")),
    ("channels_last", dict(flag="--channels-last/--no-channels-last", help="Channels-last memory format.")),
    ("compile", dict(flag="--compile/--no-compile", help="torch.compile the networks.")),
    (
        "fused_adam",
        dict(
            flag="--fused-adam/--no-fused-adam",
            help="torch's fused AdamW (CUDA): the non-finite-step "
            "guard stays on the device, no host sync inside an iteration.",
        ),
    ),
    (
        "checkpoint_activations",
        dict(
            flag="--checkpoint-activations/--no-checkpoint-activations",
            help="Recompute the U-Nets' block activations in backward: less memory for about one more forward.",
        ),
    ),
    ("seed", dict(type=seed_option_type(), metavar="INT", help="Random seed.")),
    ("device", dict(type=str, metavar="DEV", help="auto, cpu, cuda or cuda:N.")),
    ("workers", dict(type=click.IntRange(min=0), metavar="N", help="DataLoader worker processes.")),
    ("log_every", dict(type=click.IntRange(min=1), metavar="STEPS", help="Steps between log lines / stats.jsonl.")),
    (
        "ckpt_every",
        dict(
            type=click.IntRange(min=1),
            metavar="STEPS",
            help="Steps between checkpoints (one is always written at the end).",
        ),
    ),
    ("keep_ckpts", dict(type=click.IntRange(min=1), metavar="N", help="Checkpoints kept (newest).")),
    (
        "sample_every",
        dict(type=click.IntRange(min=0), metavar="STEPS", help="Steps between PNG sample grids; 0: at the end only."),
    ),
    (
        "sample_nfe",
        dict(
            type=click.IntRange(min=0),
            metavar="N",
            help="Teacher NFE of sample grids and the release's default NFE; 0: 100 (capped by n_steps - 1).",
        ),
    ),
    (
        "resume",
        dict(
            type=str,
            metavar="auto|none|PATH",
            help="Resume from the newest checkpoint in the run dir (auto), start fresh (none), "
            "or from a checkpoint file.",
        ),
    ),
    (
        "allow_config_change",
        dict(
            flag="--allow-config-change",
            is_flag=True,
            help="Resume even when --batch-size, --lr (distill: --fake-lr, --inner-steps) "
            "differ from the checkpoint's.",
        ),
    ),
    (
        "progress",
        dict(
            flag="--progress/--no-progress",
            show_default=False,
            help="Progress bar (default: on when stderr is a terminal).",
        ),
    ),
]


_MASKS_HELP = (
    "inpaint-freeform1020/2030: Palette's imagenet_freeform_masks.npz or I2SB's imagenet_freeform<range>_masks.npz."
)


def _teacher_options() -> list[tuple[str, dict]]:
    from ibmd_fast.data import DEGRADATIONS, SPEC_HELP  # lazy: the CLI starts without torch
    from ibmd_fast.models import CONFIGS  # lazy: the CLI starts without torch

    return [
        (
            "run_dir",
            dict(
                type=str,
                metavar="DIR",
                help="Output folder (config.json, stats.jsonl, checkpoints/, teacher.safetensors).",
            ),
        ),
        ("data", dict(type=str, metavar="SPEC", help=f"Training data; {SPEC_HELP}")),
        (
            "degradation",
            dict(
                type=str, metavar="NAME", help=f"Corruption x0 -> xT: {', '.join(DEGRADATIONS)} (also srKx-*, jpeg-Q)."
            ),
        ),
        ("masks", dict(type=str, metavar="FILE", help=_MASKS_HELP)),
        ("image_size", dict(type=click.IntRange(min=4), metavar="PX", help="Training crop size.")),
        ("channels", dict(type=click.Choice([1, 3]), help="Image channels (1 gray, 3 RGB).")),
        ("bridge", dict(type=click.Choice(["i2sb", "vp", "ve"]), help="Bridge: I2SB (discrete), DDBM VP or VE.")),
        (
            "beta_max",
            dict(
                type=FiniteFloat(min=0.0, min_open=True),
                metavar="FLOAT",
                help="I2SB beta_max (0.3 SR/JPEG, 1.0 inpainting).",
            ),
        ),
        ("n_steps", dict(type=click.IntRange(min=2), metavar="N", help="I2SB discretization steps.")),
        ("conditional", dict(flag="--conditional/--unconditional", help="Feed xT to the network too.")),
        ("arch", dict(type=click.Choice(sorted(CONFIGS)), help="U-Net configuration.")),
        ("lr", dict(type=FiniteFloat(min=0.0, min_open=True), metavar="LR", help="Learning rate.")),
        ("steps", dict(type=click.IntRange(min=0), metavar="N", help="Optimizer steps.")),
    ] + _SHARED_TRAIN_OPTIONS


def _distill_options() -> list[tuple[str, dict]]:
    from ibmd_fast.data import SPEC_HELP  # lazy: the CLI starts without torch

    return (
        [
            (
                "run_dir",
                dict(
                    type=str,
                    metavar="DIR",
                    help="Output folder (config.json, stats.jsonl, checkpoints/, generator.safetensors).",
                ),
            ),
            (
                "teacher",
                dict(
                    type=str,
                    metavar="PATH",
                    help="Teacher release; empty: the embedded ibmd_fast/assets/teacher-inpaint.safetensors.",
                ),
            ),
            (
                "data",
                dict(
                    type=str,
                    metavar="SPEC",
                    help=f"Corrupted images to distill on; empty: the teacher's data set. {SPEC_HELP}",
                ),
            ),
            ("degradation", dict(type=str, metavar="NAME", help="Empty: the teacher's degradation.")),
            ("masks", dict(type=str, metavar="FILE", help=_MASKS_HELP)),
            ("image_size", dict(type=click.IntRange(min=0), metavar="PX", help="0: the teacher's training size.")),
            ("nfe", dict(type=click.IntRange(min=1), metavar="N", help="Student steps (1 = one-step generator).")),
            (
                "inner_steps",
                dict(
                    type=click.IntRange(min=1), metavar="L", help="Fake-model steps per generator step (Algorithm 1)."
                ),
            ),
            ("steps", dict(type=click.IntRange(min=0), metavar="K", help="Generator steps.")),
            ("lr", dict(type=FiniteFloat(min=0.0, min_open=True), metavar="LR", help="Generator learning rate.")),
            ("fake_lr", dict(type=FiniteFloat(min=0.0, min_open=True), metavar="LR", help="Fake-model learning rate.")),
            (
                "eval_items",
                dict(
                    type=click.IntRange(min=0),
                    metavar="N",
                    help="Held-out images for the final teacher/student comparison; 0: none.",
                ),
            ),
            ("eval_teacher_nfe", dict(type=IntList(), help="Teacher NFEs in the final comparison.")),
        ]
        + _recipe_options()
        + _SHARED_TRAIN_OPTIONS
    )


def _recipe_options() -> list[tuple[str, dict]]:
    """distill's --recipe (the paper's per-task settings) and the two settings only recipes needed."""
    from ibmd_fast.train.recipes import MULTISTEP_MODES, RECIPES  # lazy: the CLI starts without torch

    return [
        (
            "recipe",
            dict(
                type=click.Choice([""] + list(RECIPES)),
                metavar="NAME",
                help=f"The paper's settings for a task (Appendix B): {', '.join(RECIPES)}. Options and "
                "--config keys given explicitly override it; --dry-run shows the result.",
            ),
        ),
        (
            "multistep",
            dict(
                type=click.Choice(list(MULTISTEP_MODES)),
                help="How a multi-step student trains: full = x0 from its whole chain, gradient through "
                "every call (I2SB, B.1); random-stop = its chain stopped at a uniformly drawn grid "
                "step, gradient through the last call (DDBM, B.2).",
            ),
        ),
        (
            "noise_input",
            dict(
                flag="--noise-input/--no-noise-input",
                help="The student takes noise z as extra input channels (zero-initialized).",
            ),
        ),
    ]


def _fallback_spec(cls, name: str) -> dict:
    """An option for a config field without a spec here (a field the trainer added later)."""
    default = _default(cls, name)
    text = f"{cls.__name__}.{name} (see its docstring)."
    if isinstance(default, bool):
        dashed = name.replace("_", "-")
        return dict(flag=f"--{dashed}/--no-{dashed}", help=text)
    if isinstance(default, int):
        return dict(type=int, metavar="INT", help=text)
    if isinstance(default, float):
        return dict(type=FiniteFloat(), metavar="FLOAT", help=text)
    if isinstance(default, (tuple, list)):
        return dict(type=IntList(), help=text)
    return dict(type=str, metavar="TEXT", help=text)


def _config_options(cls, specs: list[tuple[str, dict]]):
    """Decorator adding one option per field of ``cls`` (in field order), default read from ``cls``.

    ``specs`` give each option its type, range, metavar and help; a field without a spec still
    gets a plain option (``_fallback_spec``), and a spec without a field is dropped.
    """
    by_name = dict(specs)

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            name = f.name
            spec = dict(by_name[name]) if name in by_name else _fallback_spec(cls, name)
            default = _default(cls, name)
            decls = [spec.pop("flag")] if "flag" in spec else ["--" + name.replace("_", "-")]
            show = spec.pop("show_default", True)
            if show is True and (default == "" or isinstance(default, (tuple, list))):
                show = _show(default) or "empty"
            fn = click.option(*decls, name, default=default, show_default=show, **spec)(fn)
        return fn

    return decorate


def _common_config_options(fn):
    fn = click.option("--dry-run", is_flag=True, help="Print the resolved config (JSON) and exit.")(fn)
    fn = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        metavar="FILE",
        help="YAML or JSON file of config keys; options given here override it.",
    )(fn)
    return fn


def _resolve(ctx: click.Context, cls, options: dict, config_file: Optional[str]):
    """The config: dataclass defaults < config file < options given on the command line."""
    params = {p.name: p for p in ctx.command.params}
    given = {
        name
        for name in options
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    options = dict(options)
    if "progress" in options and "progress" not in given:
        options["progress"] = bool(options["progress"]) and sys.stderr.isatty()

    def convert(name: str, value):
        param = params.get(name)
        if param is None or value is None:
            return value
        try:
            return param.type.convert(value, param, ctx)
        except click.exceptions.BadParameter as exc:
            raise ValueError(exc.message) from None

    cfg = resolve_config(cls, options, given, config_file, convert)
    if getattr(cfg, "recipe", ""):  # defaults < recipe < config file < command line
        from ibmd_fast.train.recipes import apply_recipe  # lazy: the CLI starts without torch

        cfg = apply_recipe(cfg, keep=given | set(load_config_file(config_file) if config_file else ()))
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()  # cheap checks the trainer would make first; --dry-run shows them too
        except ValueError as exc:
            if config_file is None:
                raise
            raise ConfigError(
                f"{' '.join(str(exc).split())} (settings from the options and config file {config_file})"
            ) from None
    return cfg


def _run_trainer(ctx, config_cls, fn_name: str, options: dict, config_file, dry_run: bool) -> None:
    """Resolve the config (defaults < file < options), print it for --dry-run, else run
    ``ibmd_fast.train.<fn_name>`` with its log on stderr and the summary on stdout."""
    cfg = _resolve(ctx, config_cls, options, config_file)
    if dry_run:
        click.echo(dump_config(cfg))
        return
    import ibmd_fast.train  # lazy: the CLI starts without torch
    from ibmd_fast.train.preflight import oom_message, out_of_memory  # lazy: the CLI starts without torch

    _check_output_parent(cfg.run_dir, "--run-dir")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines; stdout carries the result
            summary = getattr(ibmd_fast.train, fn_name)(cfg)
    except (RuntimeError, MemoryError) as exc:
        if not out_of_memory(exc):
            raise
        raise click.ClickException(oom_message(exc, cfg.batch_size, cfg.image_size or None)) from None
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    """The trainer's summary: the comparison table (if any), then the scalar entries."""
    from ibmd_fast.train.report import format_comparison  # lazy: the CLI starts without torch

    comparison = summary.get("comparison")
    if comparison:
        click.echo(format_comparison(comparison, summary.get("run_dir")))
    for key, value in summary.items():
        if key == "comparison" or isinstance(value, (dict, list)):
            continue
        click.echo(f"{key}: {value}")
