"""lm-evaluation-harness on megaflow checkpoints: `megaflow eval CKPT --lm-eval TASKS`.

lm-eval 0.4 finds models only in its own registry (no entry points), so `MegaflowLM` registers itself as
`megaflow` when this module is imported, and `run_lm_eval` hands an instance straight to
`lm_eval.simple_evaluate`. The three request types map onto megaflow's inference API:

    loglikelihood(context, continuation)  -> inference.scoring.score: sum of log p(continuation | context)
                                             and whether greedy decoding would produce it
    loglikelihood_rolling(text)           -> the same over windows of the model's context, each token
                                             scored once (the first one given the end-of-document token)
    generate_until(context, until, ...)   -> inference.generate with the stop strings, greedy unless asked

Context and continuation are tokenized together and split where the context's own tokens end (a
trailing space moves to the continuation first), as lm-eval's Hugging Face model does, so scores equal
transformers' for the same weights and tokenizer. An empty context (and the first rolling window) is
given the end-of-document token: megaflow's documents end with it, so it is what text follows (lm-eval's
HF model takes a BOS when the tokenizer has one; pass it `prefix_token_id` to compare).
"""

from __future__ import annotations

from pathlib import Path

from megaflow.errors import UserError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the adapter is optional; `megaflow eval --lm-eval` says how to get it
    LM, register_model = object, None


def _register(cls):
    return register_model("megaflow")(cls) if register_model is not None else cls


@_register
class MegaflowLM(LM):
    """An lm-eval model over a megaflow final checkpoint (any TP/PP layout the process was started with)."""

    def __init__(self, ckpt: str | None = None, model=None, batch_size: int | str = 8, max_gen_toks: int = 256,
                 tp: int = 1, pp: int = 1, **_unused):
        super().__init__()
        from megaflow.inference import load_for_inference

        if model is None:
            if ckpt is None:
                raise UserError("the megaflow lm-eval model needs ckpt=PATH")
            model = load_for_inference(ckpt, tp=int(tp), pp=int(pp))
        self.model = model
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MegaflowLM":
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        return cls(**args, **{k: v for k, v in (additional_config or {}).items() if v is not None})

    # -- tokenization -----------------------------------------------------------------------------

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.model.encode(context + continuation)
        n_context = len(self.model.encode(context)) if context else 0
        return whole[:n_context], whole[n_context:]

    # -- lm-eval's three request types ---------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from megaflow.inference.scoring import score

        pairs = [self._split(*req.args) for req in requests]
        scores = score(self.model, [p for p, _ in pairs], [c for _, c in pairs], batch_size=self.batch_size)
        return [(s.sum, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests) -> list[float]:
        from megaflow.inference.scoring import score

        out = []
        window = self.model.max_sequence_length
        for req in requests:
            ids = self.model.encode(req.args[0])
            prompts, continuations = [], []
            for start in range(0, len(ids), window):  # disjoint windows: each token scored once, as lm-eval does
                prompts.append(ids[max(0, start - 1):start])  # the first: empty -> the end-of-document token
                continuations.append(ids[start:start + window])
            scores = score(self.model, prompts, continuations, batch_size=self.batch_size) if ids else []
            out.append(float(sum(s.sum for s in scores)))
        return out

    def generate_until(self, requests) -> list[str]:
        from megaflow.inference.generate import SamplingParams, generate

        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0) or 0) > 0
            params = SamplingParams(max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                                    greedy=not sample, temperature=float(kwargs.get("temperature", 1.0) or 1.0),
                                    stop_strings=until, seed=1234)
            out.append(generate(self.model, [context], params)[0].text)
        return out


def run_lm_eval(ckpt: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 8) -> dict:
    """Evaluate `tasks` on a checkpoint; returns lm-eval's results dict (per task metrics)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--lm-eval needs the lm-eval package: pip install 'megaflow[eval]'") from None
    if include_path is not None and not Path(include_path).exists():
        raise UserError(f"--lm-eval-include: not found: {include_path}")
    if not tasks:
        raise UserError("--lm-eval: no task named")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(f"--lm-eval: unknown task(s) {', '.join(unknown)} (local tasks: --lm-eval-include DIR)")
    model = MegaflowLM(ckpt, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    except (FileNotFoundError, ValueError) as e:  # a task's data file, a task without documents
        raise UserError(f"--lm-eval {','.join(tasks)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return {"lm_eval": results["results"] if results else {}}
