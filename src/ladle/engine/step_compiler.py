"""The model's step compiled by `torch.compile`, built in the background while the engine serves.

Only models that the native layer kernels cannot run compile by default (`EngineConfig.compile`
None): for those that they can (`CausalLM.runs_on_kernels`), the eager step runs the whole
decoder in one C++ operator and decodes faster than a compiled step (which traces the layers'
own path), without the compiler's minutes and ~180 MB.

A decode step of a small model is bound by the number of kernel calls (about a thousand per
token in eager PyTorch), not by arithmetic. Inductor fuses the norms, the rotary, the residual
adds and the activation into a few C++ loops and calls the matmul kernels directly; the native
kernels (`kernels/`) take attention and the fp16 head. Inductor's C++ wrapper runs the graph
without a Python line per kernel: on torch's own kernels, SmolLM2's decode step took 8.6 ms
with it, 11.5 without and 16.8 eagerly. Compiling takes one to three minutes on two cores, so
it runs on a thread of its own and the engine swaps the compiled step in when ready.

What keeps the compiled step correct:
- Attention is an opaque operator (`layers/attention.py`), so the graph holds no cache state;
  RoPE tables and the cache's bookkeeping stay on the host (`CausalLM.forward`).
- The token count and the number of logits rows are dynamic: three graphs (one token; many
  tokens with one logits row; many of both) serve every prefill chunk and decode batch; a
  chunk that needs no logits row computes one anyway (`CompiledStep`).
- Guards on the modules are skipped (checking them would cost more than the step). Instead
  `Linear` counts every change of its weight or calibration (`weights_generation`): a changed
  model runs eagerly and is compiled again once it is stable (not while it calibrates).
- Compiled code runs in dynamo's run-only mode: a shape the graphs miss runs eagerly rather
  than compiling on the engine thread in the middle of serving.
"""

from __future__ import annotations

import gc
import logging
import threading
import types
import warnings
from collections.abc import Callable

import torch

from ladle.engine.layers.attention import attention_cache
from ladle.engine.layers.linear import Linear, weights_generation
from ladle.engine.loader import release_free_memory
from ladle.engine.models.base import CausalLM, Rope

log = logging.getLogger(__name__)
# Inductor notes that the int4 layers' bf16 activations meet the fp16 head: both are intended.
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed", category=UserWarning)

# (tokens, logits rows) run once each: sizes 0 and 1 are specialized by dynamo, and a first
# size of 2 for both would tie them into one symbol, so (3, 2) comes before (2, 2).
_WARM_UP_SHAPES = ((3, 2), (2, 2), (3, 1), (1, 1))
_builds_lock = threading.Lock()
_builds_running = 0  # in this process, one per model being compiled


class StepCompiler:
    """Compiles `model.logits` on a background thread and installs it as `model.step`."""

    def __init__(self, model: CausalLM, dtype: torch.dtype) -> None:
        self.model = model
        self.dtype = dtype
        self.status = "not started"  # "compiling", "ready", "stale", "stopped", "failed: ..."
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        """Begin (or begin again) compiling in the background; a running build is left be."""
        with self._lock:
            if self._stopped:
                self.status = "stopped"
                self._ready.set()
                return
            if self._thread is not None and self._thread.is_alive():
                return
            self._ready.clear()
            self.status = "compiling"
            self._thread = threading.Thread(target=self._build, name="ladle-compile", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Give up compiling at the next warm-up shape (the model is being closed)."""
        self._stopped = True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a compiled step is installed (or the build failed); True when ready."""
        self._ready.wait(timeout)
        return self.status == "ready"

    def _build(self) -> None:
        _count_build(+1)
        try:
            for _ in range(3):  # weights that change during the build: start over
                generation = weights_generation()
                compiled = _compile(self.model)
                self._warm_up(compiled)
                if weights_generation() == generation:
                    self.model.step = CompiledStep(self, compiled, generation)
                    self.status = "ready"
                    log.info("compiled step ready for %s", type(self.model).__name__)
                    return
            self.status = "failed: the weights kept changing while compiling"
        except _Stopped:
            self.status = "stopped"
        except Exception as e:  # a compiler error must not take the engine down: stay eager
            log.warning("torch.compile failed, the model runs eagerly: %s", e)
            self.status = f"failed: {type(e).__name__}: {e}"
        finally:
            if _count_build(-1) == 0:  # another model's build may still need the workers
                _release_compiler_memory()
            self._ready.set()

    @torch.inference_mode()
    def _warm_up(self, compiled: Callable[..., torch.Tensor]) -> None:
        """Run each graph's shape once, so compiling is over before the engine calls it."""
        for num_tokens, num_rows in _WARM_UP_SHAPES:
            self._check_stopped()
            ids = torch.zeros(num_tokens, dtype=torch.long)
            rope = self.model.model.rope(torch.arange(num_tokens), num_tokens)
            rows = torch.arange(num_rows)
            if num_tokens > 1:
                torch._dynamo.mark_dynamic(ids, 0)
                for table in rope:
                    torch._dynamo.mark_dynamic(table, 0)
            if num_rows > 1:
                torch._dynamo.mark_dynamic(rows, 0)
            with attention_cache(self.model.new_cache(self.dtype, capacity=num_tokens)):
                compiled(ids, rope, rows)
        self._check_stopped()

    def _check_stopped(self) -> None:
        if self._stopped:
            raise _Stopped

    def on_stale(self) -> None:
        """The weights changed under the compiled step: compile again unless calibrating.

        Calibration changes the layers on every start and stop, so compiling waits for it to
        end (which changes the weights once more and brings the engine back here).
        """
        self.status = "stale"
        if not _calibrating(self.model):
            self.start()


class _Stopped(Exception):
    """The model closed while its step compiled."""


class CompiledStep:
    """`model.logits`, compiled, for as long as the weights it was compiled with are in place."""

    def __init__(
        self, compiler: StepCompiler, compiled: Callable[..., torch.Tensor], generation: int
    ) -> None:
        self.compiler = compiler
        self.run_compiled = torch._dynamo.run(compiled)  # cached graphs only; misses run eagerly
        self.generation = generation
        self.seen_generation = generation

    def __call__(
        self, input_ids: torch.Tensor, rope: Rope, logits_indices: torch.Tensor | None
    ) -> torch.Tensor:
        generation = weights_generation()
        if generation == self.generation:
            with torch.inference_mode():  # the graphs were traced on inference tensors
                if not input_ids.is_inference():  # (the engine's are: this is for others)
                    input_ids = input_ids.clone()
                    copies: dict[int, torch.Tensor] = {}  # a table passed twice stays one
                    rope = tuple(copies.setdefault(id(t), t.clone()) for t in rope)
                    if logits_indices is not None:
                        logits_indices = logits_indices.clone()
                if logits_indices is not None and not len(logits_indices):
                    # no graph has zero logits rows: a chunk that completes no sequence
                    # computes its last row too, then drops it, rather than run eagerly
                    last = torch.tensor([len(input_ids) - 1])
                    return self.run_compiled(input_ids, rope, last)[:0]
                return self.run_compiled(input_ids, rope, logits_indices)
        if generation != self.seen_generation:  # once per change, not on every step
            self.seen_generation = generation
            self.compiler.on_stale()
        return self.compiler.model.logits(input_ids, rope, logits_indices)


def _compile(model: CausalLM) -> Callable[..., torch.Tensor]:
    # Dynamo keeps its compiled graphs on the code object: each build gets a copy of its own,
    # so two models, or one model before and after re-quantizing, never share graphs.
    method = CausalLM.logits
    own = types.FunctionType(
        method.__code__.replace(), method.__globals__, method.__name__, None, None
    )
    return torch.compile(
        types.MethodType(own, model),
        fullgraph=True,
        options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
            "cpp_wrapper": True,
        },
    )


def _count_build(change: int) -> int:
    """Add `change` to the builds running in this process; returns how many now run."""
    global _builds_running
    with _builds_lock:
        _builds_running += change
        return _builds_running


def _release_compiler_memory() -> None:
    """Stop Inductor's compile worker processes (about 100 MB each, idle once compiled) and
    hand the compiler's freed temporaries back to the OS."""
    from torch._inductor.async_compile import shutdown_compile_workers

    shutdown_compile_workers()
    gc.collect()
    release_free_memory()


def _calibrating(model: CausalLM) -> bool:
    return any(isinstance(m, Linear) and m.calibration is not None for m in model.modules())
