"""The one place a restoration chain runs: known pixels, the student chain, the teacher dispatch.

Every caller goes through here (the k-diffusion / EDM habit), so a fix lands once and training
and inference cannot drift apart:

- ``impose_known`` / ``fill_hole`` / ``noise_like``: inpainting's known pixels (MATH.md 3), defined in
  ``known_pixels.py`` below the samplers and this module; the chains here use them.
- ``student_chain(generator, xT, z, nfe, mask, noise)``: the IBMD student's chain (MATH.md 5) with
  an injected noise source (``SeededNoise``: the fused op's Philox noise from seeds;
  ``GivenNoise``: tensors, plain arithmetic). Its three callers: inference (``sample_student``),
  the distiller's ``IBMD.generate`` (a chain cut at the drawn grid point) and the ONNX exporter,
  which traces it.
- ``restore(teacher, xT, sampler, nfe, eta)``: the teacher-sampler dispatch (MATH.md 3) used by
  ``sample``, ``eval``, the trainers' sample grids and the benchmarks.
- ``sample_teacher`` / ``sample_student``: one batch; ``restore_with_teacher`` /
  ``restore_with_generator``: many images in batches with one seeded noise source;
  ``restore_release`` / ``timed_restore``: dispatch on a loaded release's kind.
(The end-of-distillation table that runs these, ``compare``, is in ``train/report.py``.)

Images are float ``[B, C, H, W]`` in [-1, 1]; masks are 1 inside the hole.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ibmd_fast import ops, reference, samplers
from ibmd_fast.bridges import Bridge, I2SBBridge
from ibmd_fast.known_pixels import fill_hole, impose_known
from ibmd_fast.timing import Stopwatch

__all__ = [
    "SAMPLERS",
    "SeededNoise",
    "GivenNoise",
    "student_grid",
    "student_chain",
    "draw_z",
    "natural_sampler",
    "default_teacher_nfe",
    "valid_teacher_nfe",
    "restore",
    "sample_teacher",
    "sample_student",
    "restore_with_teacher",
    "restore_with_generator",
    "restore_release",
    "check_labels",
    "timed_restore",
]

SAMPLERS = ("i2sb", "dbim", "heun")

Autocast = Optional[Callable[[], contextlib.AbstractContextManager]]


# ----------------------------------------------------------------------------
# Noise sources of the student chain


class SeededNoise:
    """Fresh noise from the fused op's Philox stream: one seed per posterior step, drawn from
    ``rng`` (a ``torch.Generator``), so a seed gives the same images on CPU and CUDA.
    Inference and the distiller use it."""

    def __init__(self, rng: torch.Generator):
        self.rng = rng

    def posterior_step(self, bridge: Bridge, x_t, x0_hat, s, t) -> torch.Tensor:
        return bridge.posterior_step(x_t, x0_hat, s, t, seed=ops.draw_seed(self.rng))


class GivenNoise:
    """Fresh noise given as tensors, one per posterior step in order (the ONNX graph's ``noise_n``).

    The step is plain arithmetic (``reference.bridge_step``), so a traced chain holds standard
    operators only. ``coefs``: per step ``(coef_xt, coef_x0, std)`` as Python floats, for a chain
    that is traced (the exporter computes them once, so no float64 time arithmetic enters the
    graph); default: ``bridge.posterior(s, t)``.
    """

    def __init__(self, noises: Sequence[torch.Tensor], coefs: Optional[Sequence[tuple]] = None):
        self.noises = list(noises)
        self.coefs = None if coefs is None else list(coefs)
        self.steps = 0

    def posterior_step(self, bridge: Bridge, x_t, x0_hat, s, t) -> torch.Tensor:
        i, self.steps = self.steps, self.steps + 1
        if self.coefs is not None:
            coef_xt, coef_x0, std = self.coefs[i]
        else:
            coef_x0, coef_xt, std = bridge.posterior(s, t)
        return reference.bridge_step(x_t, x0_hat, coef_xt, coef_x0, std, noise=self.noises[i])


# ----------------------------------------------------------------------------
# The student chain (MATH.md 5)


def student_grid(bridge: Bridge, nfe: int) -> torch.Tensor:
    """The student's grid ``t_1 < ... < t_k = T`` (k = nfe; MATH.md 5): ``bridge.sampling_grid(nfe)``
    without its first point. Training and inference of a multi-step student use the same."""
    return bridge.sampling_grid(nfe)[1:]


def student_chain(
    generator,
    xT: torch.Tensor,
    z: Optional[torch.Tensor],
    nfe: int = 1,
    mask: Optional[torch.Tensor] = None,
    noise=None,
    *,
    stop: int = 1,
    last_call=None,
    autocast: Autocast = None,
    callback=None,
    grid: Optional[Sequence] = None,
    time_batch: Optional[int] = None,
    grad_chain: bool = False,
    y: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The IBMD student's chain in ``nfe`` calls (MATH.md 5); returns the last prediction ``x0~``.

    ``x = xT``; for n = k..``stop``: ``x0~ = generator(xT, z, t=t_n, x_t=x)`` and, before the last
    call, the posterior step to ``t_{n-1}`` with ``noise`` (``SeededNoise`` / ``GivenNoise``;
    default: seeds from torch's default generator). ``nfe = 1`` is ``generator(xT, z, T)``.

    - ``generator``: a ``Generator`` (or anything called so, with a ``bridge``).
    - ``xT``: the corrupted images, the inpainting hole already filled (``fill_hole``); ``z`` the
      student's noise, the same for every call (None for a generator without z channels).
    - ``mask``: every ``x0~`` takes its known pixels from ``xT`` (the student predicts the hole).
    - ``stop = n``: end with the call at ``t_n`` (the distiller's draw). Calls before the last run
      without gradient (their states are the student's own samples, data to the last call); the
      last runs in the caller's grad mode, through ``last_call`` (default ``generator``: the
      distiller passes its DDP wrapper).
    - ``grad_chain``: the calls before the last and the posterior steps run in the caller's grad
      mode too, so ``x0~`` is differentiable through the whole chain (the distiller's ``multistep =
      "full"``, the paper's I2SB students); default: without gradient, as above.
    - ``autocast``: a callable returning the context each call runs in (``Precision.autocast``).
    - ``callback(info)`` once per call (``step``, ``t``, ``s``, ``x``, ``x0_hat``, ``std``, ``nfe``).
    - ``grid``: ``student_grid(bridge, nfe)`` as Python values, when the caller has it (a traced
      chain must); ``time_batch``: the batch of the time tensors (the exporter's 1 broadcasts
      and stays a constant of the graph); default the batch of ``xT``.
    - ``y``: class labels [B] (int64) of a class-conditional generator, given to every call.
    """
    bridge = generator.bridge
    if not 1 <= stop <= nfe:
        raise ValueError(f"stop must be in [1, nfe={nfe}], got {stop}")
    noise = SeededNoise(samplers.make_rng()) if noise is None else noise
    grid = student_grid(bridge, nfe).tolist() if grid is None else list(grid)
    batch = xT.shape[0] if time_batch is None else int(time_batch)
    device = xT.device
    ctx = autocast or contextlib.nullcontext

    def call(model, x, t):
        with ctx():
            x0 = (model(xT, z, t=t, x_t=x) if y is None else model(xT, z, t=t, x_t=x, y=y)).to(x.dtype)
        return x0 if mask is None else impose_known(x0, xT, mask)  # the student predicts only the hole

    x = xT
    with contextlib.nullcontext() if grad_chain else torch.no_grad():
        for n in range(nfe, stop, -1):  # t_n from T down to t_{stop+1}: grid[n - 1] is t_n
            t = bridge.times(grid[n - 1], batch, device)
            s = bridge.times(grid[n - 2], batch, device)
            x0 = call(generator, x, t)
            # Posterior step t_n -> t_{n-1} (MATH.md 3) with x0~ in place of x0.
            x = noise.posterior_step(bridge, x, x0, s, t)
            if callback is not None:
                callback(dict(step=nfe - n, t=t, s=s, x=x, x0_hat=x0, std=bridge.posterior(s, t)[2], nfe=nfe - n + 1))
    t = bridge.times(grid[stop - 1], batch, device)
    x0 = call(last_call or generator, x, t)
    if callback is not None:
        callback(dict(step=nfe - stop, t=t, s=None, x=x, x0_hat=x0, std=None, nfe=nfe - stop + 1))
    return x0


def draw_z(generator, xT: torch.Tensor, rng: torch.Generator) -> Optional[torch.Tensor]:
    """The student's noise ``z``: standard normal ``[B, z_channels, H, W]`` drawn on ``rng``'s
    device (CPU unless given) and moved to ``xT``'s, so a seed gives the same z on every device.
    None for a generator without z channels."""
    channels = int(getattr(generator, "z_channels", xT.shape[1]))
    if channels == 0:
        return None
    z = torch.randn((xT.shape[0], channels, *xT.shape[2:]), generator=rng, dtype=torch.float32, device=rng.device)
    return z.to(device=xT.device, dtype=xT.dtype)


# ----------------------------------------------------------------------------
# The teacher (MATH.md 3)


# DBIM's eta when none is given: the default of thu-ml/DiffusionBridge's sample_dbim and of its
# sample.py (--eta 1.0; its scripts pass eta, and its paper's tables mostly use eta = 0).
DBIM_ETA = 1.0


def check_eta(eta: Optional[float], sampler: str) -> float:
    """The eta a teacher sampler runs with; an explicit eta for another sampler is an error."""
    if eta is None:
        return DBIM_ETA
    if sampler != "dbim":
        raise ValueError(f"--eta applies to the dbim sampler only; this teacher samples with {sampler}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta must be in [0, 1], got {eta}")
    return float(eta)


def used_eta(teacher, sampler: Optional[str], eta: Optional[float]) -> Optional[float]:
    """The eta recorded with a teacher release's results: the DBIM one, None for the other samplers."""
    if teacher is None or (sampler or natural_sampler(teacher.bridge_type)) != "dbim":
        return None
    return DBIM_ETA if eta is None else float(eta)


def natural_sampler(bridge_type: str) -> str:
    """The default teacher sampler: I2SB's posterior sampler for I2SB, DBIM for the VP (DDBM) bridge."""
    return "i2sb" if bridge_type == "i2sb" else "dbim"


def default_teacher_nfe(bridge) -> int:
    """The teacher's default sampling NFE (recorded in its release): 100, or fewer for short I2SB schedules."""
    if isinstance(bridge, I2SBBridge):
        return min(100, bridge.n_steps - 1)
    return 100


def valid_teacher_nfe(bridge, nfes: Sequence[int]) -> list[int]:
    """The NFEs a teacher can run: clipped to ``n_steps - 1`` for I2SB, deduplicated, ascending."""
    top = bridge.n_steps - 1 if isinstance(bridge, I2SBBridge) else None
    out = sorted({max(1, min(int(n), top) if top else int(n)) for n in nfes})
    return out


def _check_sampler(sampler: Optional[str], bridge_type: str) -> str:
    sampler = sampler or natural_sampler(bridge_type)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if sampler == "i2sb" and bridge_type != "i2sb":
        raise ValueError(
            f"the i2sb sampler needs an I2SB teacher; this one has a {bridge_type.upper()} (DDBM) bridge: "
            "use dbim or heun"
        )
    if sampler == "heun" and bridge_type not in ("vp", "ve"):
        raise ValueError(
            "the heun sampler needs a VP or VE (DDBM) teacher; this one has an I2SB bridge: use i2sb or dbim"
        )
    return sampler


@torch.no_grad()
def restore(
    teacher,
    xT: torch.Tensor,
    sampler: Optional[str] = None,
    nfe: Optional[int] = None,
    eta: Optional[float] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    rng: Optional[torch.Generator] = None,
    autocast: Autocast = None,
    y: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Restore one batch ``xT`` with a ``Teacher`` in ``nfe`` network calls (MATH.md 3).

    ``sampler``: "i2sb" (I2SB bridge only), "dbim" (both bridges; ``eta`` in [0, 1]; None: ``DBIM_ETA``,
    DBIM's default; 0 is deterministic; an eta for another sampler is an error) or "heun" (VP bridge
    only); None picks ``natural_sampler``. ``nfe`` None: the bridge's
    ``default_teacher_nfe``. Noise: ``seed`` or ``rng`` (``samplers.make_rng``). Inpainting
    (``mask``): the hole of ``xT`` is filled with noise first (the filled image is also what a
    conditional teacher sees, as in training), the i2sb sampler re-imposes the known pixels at
    every step, and the result takes them from ``xT``. ``autocast`` as in ``student_chain``.
    ``y``: class labels [B] of a class-conditional teacher (default: the release's ``class_label``).
    Returns the sampler's last prediction, in ``xT``'s dtype, unclamped.
    """
    sampler = _check_sampler(sampler, teacher.bridge_type)
    eta = check_eta(eta, sampler)
    nfe = default_teacher_nfe(teacher.bridge) if nfe is None else int(nfe)
    if nfe < 1:
        raise ValueError(f"nfe must be at least 1, got {nfe}")
    rng = samplers.make_rng(seed, rng)
    if mask is not None:
        mask = mask.to(device=xT.device, dtype=xT.dtype)
        xT = fill_hole(xT, mask, ops.draw_seed(rng))
    cond = xT if teacher.conditional else None
    ctx = autocast or contextlib.nullcontext

    def predict_x0(x_t, t):
        with ctx():
            return teacher.predict_x0(x_t, t, cond, y=y)

    bridge = teacher.bridge
    if sampler == "i2sb":
        x0 = samplers.i2sb_sample(predict_x0, bridge, xT, nfe, mask=mask, rng=rng, noise_fill=False)
    elif sampler == "dbim":
        x0 = samplers.dbim_sample(predict_x0, bridge, xT, nfe, eta=eta, rng=rng)
    else:
        x0 = samplers.heun_sample(predict_x0, bridge, xT, nfe, rng=rng)
    return x0 if mask is None else impose_known(x0, xT, mask)  # known pixels unchanged


def sample_teacher(
    teacher,
    xT: torch.Tensor,
    nfe: int,
    mask: Optional[torch.Tensor] = None,
    seed: int = 0,
    autocast: Autocast = None,
    y: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``restore`` with the natural sampler: the trainers' sample grids and ``compare``."""
    return restore(teacher, xT, None, nfe, mask=mask, seed=seed, autocast=autocast, y=y)


def _check_student_nfe(generator, nfe: int) -> None:
    if nfe < 1:
        raise ValueError(f"nfe must be at least 1, got {nfe}")
    if nfe > 1 and not getattr(generator, "multistep", False):
        raise ValueError(f"this generator is a one-step student; it cannot sample with nfe={nfe}")


@torch.no_grad()
def sample_student(
    generator,
    xT: torch.Tensor,
    nfe: int = 1,
    mask: Optional[torch.Tensor] = None,
    seed: Optional[int] = 0,
    rng: Optional[torch.Generator] = None,
    autocast: Autocast = None,
    y: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Restore one batch ``xT`` with an IBMD student in ``nfe`` calls (MATH.md 5; ``student_chain``).

    From one noise source (``seed`` or ``rng``), in order: the hole fill (inpainting), ``z``
    (``draw_z``), then one seed per posterior step. ``y``: class labels [B] of a class-conditional
    student. Returns ``xT``'s dtype, unclamped.
    """
    _check_student_nfe(generator, nfe)
    rng = samplers.make_rng(seed, rng)
    if mask is not None:
        mask = mask.to(device=xT.device, dtype=xT.dtype)
        xT = fill_hole(xT, mask, ops.draw_seed(rng))
    z = draw_z(generator, xT, rng)
    return student_chain(generator, xT, z, nfe, mask=mask, noise=SeededNoise(rng), autocast=autocast, y=y)


# ----------------------------------------------------------------------------
# Many images, in batches


def _mask_batch(mask: Optional[torch.Tensor], start: int, stop: int, total: int) -> Optional[torch.Tensor]:
    """The rows of ``mask`` for images ``start:stop``; a mask without a batch (or of batch 1) is shared."""
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    if mask.shape[0] == total and total > 1:
        return mask[start:stop]
    return mask.expand(stop - start, *mask.shape[1:])


def _batches(xT: torch.Tensor, mask, batch_size: int, device, progress: bool, desc: str, labels=None):
    """``(images, mask, labels)`` of each batch, images float32 and labels int64 on ``device``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    total = xT.shape[0]
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.shape[0] != total:
            raise ValueError(f"need one class label per image: {total} image(s), {labels.shape[0]} label(s)")
    for start in tqdm(range(0, total, batch_size), desc=desc, disable=not progress, leave=False, unit="batch"):
        stop = min(start + batch_size, total)
        m = _mask_batch(mask, start, stop, total)
        yield (
            xT[start:stop].to(device, torch.float32),
            (None if m is None else m.to(device, torch.float32)),
            None if labels is None else labels[start:stop].to(device),
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def restore_with_teacher(
    teacher,
    xT: torch.Tensor,
    nfe: int,
    sampler: Optional[str] = None,
    mask: Optional[torch.Tensor] = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    eta: Optional[float] = None,
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Restore ``xT`` [N, C, H, W] with a teacher in ``nfe`` network calls per image (``restore``),
    in batches drawing from one noise source seeded with ``seed``. ``mask``: [N or 1, 1, H, W];
    ``labels``: [N] class labels of a class-conditional teacher.
    Returns float32 images in [-1, 1] on the CPU."""
    sampler = _check_sampler(sampler, teacher.bridge_type)  # before any batch (restore checks nfe)
    check_eta(eta, sampler)  # before any batch; restore() resolves None to DBIM_ETA
    rng = samplers.make_rng(seed)
    out = [
        restore(teacher, x, sampler, nfe, eta, mask=m, rng=rng, y=y).float().clamp(-1.0, 1.0).cpu()
        for x, m, y in _batches(
            xT, mask, batch_size, _model_device(teacher), progress, f"teacher {sampler} nfe={nfe}", labels
        )
    ]
    return torch.cat(out)


def restore_with_generator(
    generator,
    xT: torch.Tensor,
    nfe: int = 1,
    mask: Optional[torch.Tensor] = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Restore ``xT`` [N, C, H, W] with an IBMD student in ``nfe`` calls per image (the NFE it was
    distilled for; ``sample_student``), in batches drawing from one noise source seeded with
    ``seed``. ``mask`` and ``labels`` as in ``restore_with_teacher``. Returns float32 images in
    [-1, 1] on the CPU."""
    _check_student_nfe(generator, nfe)
    rng = samplers.make_rng(seed)
    out = [
        sample_student(generator, x, nfe, m, seed=None, rng=rng, y=y).float().clamp(-1.0, 1.0).cpu()
        for x, m, y in _batches(xT, mask, batch_size, _model_device(generator), progress, f"student nfe={nfe}", labels)
    ]
    return torch.cat(out)


def check_labels(model, labels, what: str = "") -> None:
    """One line when a class-conditional model (``num_classes``) gets no labels, or labels out of its range,
    or an unconditional one gets labels. A teacher release with a default ``class_label`` needs none."""
    num_classes = getattr(model, "num_classes", None)
    where = f" {what}" if what else ""
    if num_classes is None:
        if labels is not None:
            raise ValueError(f"class labels given, but the model{where} is not class-conditional")
        return
    if labels is None:
        if getattr(model, "class_label", None) is None:
            raise ValueError(
                f"the model{where} is class-conditional ({num_classes} classes) and needs a class "
                "label per image: give labelled data (classes:DIR) or --labels FILE.csv / --class-label N"
            )
        return
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"class label {int(bad[0])} is out of range: the model{where} has {num_classes} classes "
            f"(labels 0..{num_classes - 1})"
        )


def restore_release(
    loaded, xT, nfe=None, sampler=None, mask=None, seed=0, batch_size=16, progress=False, eta=None, labels=None
):
    """Restore with a loaded release (``release.LoadedModel``), dispatching on its kind. Generators
    refuse an NFE other than their own, samplers and eta. ``labels``: [N] class labels of a
    class-conditional release (``check_labels``)."""
    if loaded.kind == "teacher":
        check_labels(loaded.model, labels, loaded.path)
        return restore_with_teacher(
            loaded.model, xT, nfe or loaded.nfe, sampler, mask, seed, batch_size, progress, eta, labels
        )
    if sampler is not None or eta is not None:
        raise ValueError(
            f"{loaded.path} is a distilled generator; --{'sampler' if sampler else 'eta'} applies to teachers only"
        )
    if nfe is not None and nfe != loaded.nfe:
        raise ValueError(
            f"{loaded.path} is a generator distilled for {loaded.nfe} step(s); it samples with "
            f"nfe={loaded.nfe} only (--nfe applies to teachers)"
        )
    check_labels(loaded.model, labels, loaded.path)
    return restore_with_generator(loaded.model, xT, loaded.nfe, mask, seed, batch_size, progress, labels)


def timed_restore(loaded, xT, nfe, sampler, mask, seed, batch_size, progress, warmup=True, eta=None, labels=None):
    """(restored, seconds per image) of ``restore_release``. A one-image warm-up call first keeps
    one-time costs out."""
    device = _model_device(loaded.model)
    if warmup:
        restore_release(
            loaded,
            xT[:1],
            1 if loaded.kind == "teacher" else None,
            sampler,
            None if mask is None else _mask_batch(mask, 0, 1, xT.shape[0]),
            seed,
            1,
            False,
            eta,
            None if labels is None else labels[:1],
        )
    with Stopwatch(device) as watch:
        restored = restore_release(loaded, xT, nfe, sampler, mask, seed, batch_size, progress, eta, labels)
    return restored, watch.seconds / xT.shape[0]
