"""Record the Triton launches the public ops make, with the tiles a GPU would get, without running them.

Used by ``compile_check.py``. Every op of ``OP_CONFIGS`` runs forward and backward on small CPU
tensors with ``backend="triton"`` inside ``gpu_tiles("sm80" | "sm90")``, while ``recording`` stands
in for every Triton kernel launch (``kernel[grid](*args, **kwargs)``): it stores the kernel, each
argument's type (tensor dtype and 16-byte alignment, Python scalars by value), the constexprs and
``num_warps`` / ``num_stages``, and returns without executing anything. Output buffers allocated
with ``torch.empty`` / ``torch.empty_like`` come back zero-filled, so the ops' host-side code after a
launch (metrics, convergence warnings) sees finite numbers.

The launch is recorded by value, not compiled here: the compiler worker (``compile_check.py``)
imports the kernel module again with Triton's JIT (this process runs under ``TRITON_INTERPRET=1``)
and lets Triton's own binder turn the recorded arguments into the signature, constexprs and
specialisation attributes a GPU launch would compile.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import sys

import torch

# Kernels run under Triton's interpreter here (never executed: recorded). Must precede pyfastrl.
os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import pyfastrl  # noqa: E402
from pyfastrl.kernels.grpo_loss.reference import IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS, LOSS_TYPES  # noqa: E402
from pyfastrl.kernels.launch_target import GPU_TARGETS, gpu_tiles  # noqa: E402

LLA_HEAD_DIMS = (64, 128)
ATTENTION_HEAD_DIMS = (64, 80, 128, 256)  # 80: a head dim that is not a power of two
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADS = {"MHA": (4, 4), "GQA": (8, 2)}  # (query heads, kv heads)
VOCAB = 151_936  # Qwen2/2.5/3's LM head
HIDDEN = 64
KERNEL_PACKAGE = "pyfastrl.kernels."
# Ops run on CUDA tensors where there is a GPU (the Triton backend needs them there); nothing runs.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a GPU would compile it.

    ``params``: (name, descriptor) in the kernel's parameter order; a descriptor is
    ``("tensor", dtype name, aligned to 16 bytes)`` or ``("value", python value)``.
    ``options``: (name, value) of the launch options (``num_warps``, ``num_stages``, ...)."""

    kernel: str  # "module:function"
    params: tuple
    options: tuple
    constexprs: frozenset

    def key(self) -> tuple:
        """What Triton's compile cache keys on: values of constexprs, the class (i32/i64, == 1,
        divisible by 16) of runtime integers, tensor dtypes and alignment; not scalar values."""
        return (self.kernel, tuple(_specialisation(name in self.constexprs, d) for name, d in self.params),
                self.options)

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]

    def describe(self) -> str:
        """Short text: the tensors' dtypes, the constexprs and the launch options."""
        dtypes = []
        for _, (kind, *rest) in self.params:
            if kind == "tensor" and rest[0] not in dtypes:
                dtypes.append(rest[0])
        consts = [f"{n}={d[1]}" for n, d in self.params if n in self.constexprs and d[1] is not None]
        opts = [f"{n}={v}" for n, v in self.options]
        return " ".join(["/".join(dtypes)] + consts + opts)


def _specialisation(constexpr: bool, descriptor: tuple):
    kind, *rest = descriptor
    if constexpr or kind == "tensor":
        return descriptor
    value = rest[0]
    if isinstance(value, bool) or not isinstance(value, int):
        return (kind, type(value).__name__)
    width = "i32" if -2**31 <= value < 2**31 else "i64"
    return (kind, width, value == 1, value % 16 == 0)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _descriptor(value) -> tuple:
    if isinstance(value, torch.Tensor):
        # On a GPU the allocation is aligned; a view is as aligned as its offset.
        return ("tensor", _dtype_name(value.dtype), value.storage_offset() * value.element_size() % 16 == 0)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return ("value", value)
    if isinstance(value, triton.language.constexpr):
        return ("value", value.value)
    raise TypeError(f"compile_record: cannot record a kernel argument of type {type(value).__name__}")


def describe_launch(fn, args, kwargs) -> Launch:
    """The ``Launch`` of ``fn[grid](*args, **kwargs)`` (fn: an interpreted or JIT Triton function)."""
    python_fn = fn.fn
    signature = inspect.signature(python_fn)
    names = set(signature.parameters)
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
    bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    constexprs = frozenset(n for n, p in signature.parameters.items() if "constexpr" in str(p.annotation))
    params = tuple((name, _descriptor(value)) for name, value in bound.arguments.items())
    return Launch(f"{python_fn.__module__}:{python_fn.__name__}", params, options, constexprs)


def _zeros(*args, **kwargs):
    return torch.zeros(*args, **kwargs)


def _zeros_like(*args, **kwargs):
    return torch.zeros_like(*args, **kwargs)


@contextlib.contextmanager
def _patched(patches):
    """Set ``(object, attribute, value)`` for the block, then restore every attribute."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def _kernel_modules():
    """pyfastrl's kernel modules (imported: a wrapper's module-level state must exist to patch)."""
    for name in ("prefix_attention", "local_linear_attention", "grpo_loss"):
        importlib.import_module(f"{KERNEL_PACKAGE}{name}.kernel")
    return [m for n, m in list(sys.modules.items()) if n.startswith(KERNEL_PACKAGE) and m is not None]


@contextlib.contextmanager
def recording(target: str):
    """Inside the block, Triton launches are recorded (list yielded) instead of run, and every
    wrapper picks ``target``'s tiles (``"sm80"`` / ``"sm90"``).

    Wrappers choose tiles through ``tile_target(device)`` (forced by ``gpu_tiles``). Wrappers that
    still ask ``triton_interpreting()`` or read a module-level ``INTERPRETED`` flag see False here,
    in the kernel modules only (the backend resolution still allows Triton on CPU)."""
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(describe_launch(self, args, kwargs))

    patches = [(InterpretedFunction, "run", record), (JITFunction, "run", record),
               (torch, "empty", _zeros), (torch, "empty_like", _zeros_like)]
    for module in _kernel_modules():
        if isinstance(getattr(module, "INTERPRETED", None), bool):
            patches.append((module, "INTERPRETED", False))
        if callable(getattr(module, "triton_interpreting", None)):
            patches.append((module, "triton_interpreting", lambda: False))
    with _patched(patches), gpu_tiles(target):
        yield launches


# ----------------------------------------------------------------------------- op configurations


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """One call (forward and backward) of a public op: ``run()`` makes its launches."""

    op: str
    label: str
    run: object
    quick: bool  # part of the --quick grid

    @property
    def name(self) -> str:
        return f"{self.op} {self.label}"


def _leaf(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype).requires_grad_()


def _prefix_attention(dtype, head_dim, heads):
    def run():
        # Token counts not multiples of 16 (as most real batches): no divisibility specialisation.
        layout = pyfastrl.PrefixGroupLayout([45, 30], [[21, 13, 7], [9, 17]])
        t = layout.total_tokens
        q = _leaf(t, heads[0], head_dim, dtype=dtype)
        k, v = (_leaf(t, heads[1], head_dim, dtype=dtype) for _ in range(2))
        pyfastrl.prefix_grouped_attention(q, k, v, layout, backend="triton").sum().backward()
    return run


def _prefix_tree_attention(dtype, head_dim, heads, softcap=None, sliding_window=None):
    def run():
        # Depth 3, two roots, a first child contiguous with its parent and later children that are not.
        layout = pyfastrl.PrefixTreeLayout([-1, 0, 1, 1, 0, -1, 5], [45, 21, 13, 7, 9, 30, 17])
        t = layout.total_tokens
        q = _leaf(t, heads[0], head_dim, dtype=dtype)
        k, v = (_leaf(t, heads[1], head_dim, dtype=dtype) for _ in range(2))
        pyfastrl.prefix_grouped_attention(q, k, v, layout, softcap=softcap, sliding_window=sliding_window,
                                          backend="triton").sum().backward()
    return run


def _lla(dtype, head_dim, heads):
    def run():
        q = _leaf(2, 75, heads[0], head_dim, dtype=dtype)
        k, v = (_leaf(2, 75, heads[1], head_dim, dtype=dtype) for _ in range(2))
        pyfastrl.local_linear_attention(q, k, v, ridge_lambda=torch.full((heads[0],), 0.5, requires_grad=True),
                                        backend="triton").sum().backward()
    return run


def _loss_inputs(dtype, rows=4, length=37):
    logp = (-torch.rand(rows, length)).to(dtype).requires_grad_()
    mask = torch.rand(rows, length) > 0.2
    return logp, mask, torch.randn(rows)


def _loss_kwargs(loss_type, level, kl, delta, dtype, shape):
    return dict(loss_type=loss_type, importance_sampling_level=level, delta=delta,
                beta=0.04 if kl else 0.0, kl_estimator=kl or "k3", max_completion_length=shape[-1],
                old_per_token_logps=(-torch.rand(*shape)).to(dtype),
                ref_per_token_logps=(-torch.rand(*shape)).to(dtype))


def _grpo_loss(dtype, loss_type, level, kl, delta):
    def run():
        logp, mask, adv = _loss_inputs(dtype)
        loss, _ = pyfastrl.grpo_loss(logp, mask, advantages=adv, backend="triton",
                                     **_loss_kwargs(loss_type, level, kl, delta, dtype, logp.shape))
        loss.backward()
    return run


def _fused_loss(dtype, loss_type, level, kl, delta):
    def run():
        hidden = _leaf(2, 9, HIDDEN, dtype=dtype)
        weight = _leaf(VOCAB, HIDDEN, dtype=dtype)
        targets = torch.randint(0, VOCAB, (2, 9))
        mask = torch.ones(2, 9, dtype=torch.bool)
        loss, _ = pyfastrl.fused_linear_grpo_loss(
            hidden, weight, targets, mask, advantages=torch.randn(2), backend="triton",
            **_loss_kwargs(loss_type, level, kl, delta, dtype, targets.shape))
        loss.backward()
    return run


def _selective_logprobs(dtype):
    def run():
        hidden = torch.randn(2, 9, HIDDEN).to(dtype)
        weight = torch.randn(VOCAB, HIDDEN).to(dtype)
        pyfastrl.selective_logprobs(hidden, weight, torch.randint(0, VOCAB, (2, 9)), return_entropy=True,
                                    backend="triton")
    return run


def _loss_variants():
    """(loss type, level, KL estimator or None, delta, in --quick): every loss type at both levels
    with KL k3; no KL and the other KL estimators at token level (the KL term does not depend on
    the level); the two-sided clip at both levels."""
    variants = [(loss, level, "k3", None, loss in ("dapo", "cispo"))
                for loss in LOSS_TYPES for level in IMPORTANCE_SAMPLING_LEVELS]
    variants += [("grpo", "token", kl, None, False) for kl in (None, *(k for k in KL_ESTIMATORS if k != "k3"))]
    variants += [("grpo", level, "k3", 4.0, True) for level in IMPORTANCE_SAMPLING_LEVELS]
    return variants


def _loss_label(dtype_name, loss, level, kl, delta):
    return f"{dtype_name} {loss} {level} kl={kl or 'off'}" + (f" delta={delta:g}" if delta else "")


def op_configs() -> list[OpConfig]:
    """Every op configuration the check records (``quick`` marks the --quick subset).

    Attention: bf16 at every head dim with MHA and GQA; fp16 and fp32 with GQA (MHA differs only
    in the constexpr ``REP``, covered by bf16); prefix trees likewise with GQA. GRPO: every loss variant in bf16; fp16 and fp32 once
    (they change only pointer types)."""
    configs = []
    attention = [("prefix_grouped_attention", ATTENTION_HEAD_DIMS, _prefix_attention),
                 ("local_linear_attention", LLA_HEAD_DIMS, _lla)]
    for op, head_dims, build in attention:
        for dtype_name, dtype in DTYPES.items():
            for head_dim in head_dims:
                for heads_name, heads in HEADS.items():
                    if dtype_name != "bf16" and heads_name == "MHA":
                        continue
                    quick = dtype_name != "fp16" and heads_name == "GQA" and head_dim != 80
                    configs.append(OpConfig(op, f"{dtype_name} D={head_dim} {heads_name}",
                                            build(dtype, head_dim, heads), quick))
    # Trees (the forward and dQ read key-tile lists): GQA at every head dim; in bf16 and fp32 also
    # with soft-capping and a window (more live values; dK/dV then takes its "window" tiles).
    for dtype_name, dtype in DTYPES.items():
        for head_dim in ATTENTION_HEAD_DIMS:
            options = [("", {})] + ([(" softcap window", dict(softcap=30.0, sliding_window=40))]
                                    if dtype_name != "fp16" else [])
            for label, kwargs in options:
                configs.append(OpConfig("prefix_grouped_attention", f"{dtype_name} D={head_dim} GQA tree{label}",
                                        _prefix_tree_attention(dtype, head_dim, HEADS["GQA"], **kwargs),
                                        dtype_name != "fp16" and head_dim != 80 and not label))
    for dtype_name, dtype in DTYPES.items():
        for loss, level, kl, delta, quick in _loss_variants():
            if dtype_name != "bf16" and (loss, level, kl, delta) != ("dapo", "token", "k3", None):
                continue
            label = _loss_label(dtype_name, loss, level, kl, delta)
            quick = quick and dtype_name == "bf16"
            configs.append(OpConfig("grpo_loss", label, _grpo_loss(dtype, loss, level, kl, delta), quick))
            configs.append(OpConfig("fused_linear_grpo_loss", f"{label} V={VOCAB}",
                                    _fused_loss(dtype, loss, level, kl, delta), quick))
        configs.append(OpConfig("selective_logprobs", f"{dtype_name} V={VOCAB}", _selective_logprobs(dtype),
                                dtype_name == "bf16"))
    return configs


@dataclasses.dataclass
class Recorded:
    """The distinct launches of one target, each with the op configurations that make it, and the
    configurations an op refused (with its message)."""

    target: str
    launches: dict  # Launch.key() -> (Launch, [config names])
    refused: dict  # config name -> error message
    routed: dict  # config name -> message: fp32 the Triton kernels hand to backend='torch' on this GPU


def routed_to_torch(config: OpConfig, message: str) -> bool:
    """An fp32 configuration the op refuses on the Triton backend with a pointer to ``backend='torch'``
    (its ``"auto"`` runs it there): by design, not a failure. Only fp32: bf16/fp16 must compile."""
    return config.label.startswith("fp32") and "backend='torch'" in message


def record(target: str, configs: list[OpConfig]) -> Recorded:
    """Run every configuration under ``recording(target)``; launches deduplicated by ``Launch.key``."""
    if target not in GPU_TARGETS:
        raise ValueError(f"record: target must be one of {GPU_TARGETS}, got {target!r}")
    result = Recorded(target, {}, {}, {})
    for config in configs:
        torch.manual_seed(0)
        try:
            with recording(target) as launches, DEVICE:
                config.run()
        except (ValueError, TypeError, NotImplementedError) as error:
            message = f"{type(error).__name__}: {error}"
            (result.routed if routed_to_torch(config, message) else result.refused)[config.name] = message
            continue
        for launch in launches:
            entry = result.launches.setdefault(launch.key(), (launch, []))
            if config.name not in entry[1]:
                entry[1].append(config.name)
    return result
