"""Human preference labelling: two models' answers to the same prompt side by side in a local web page;
a person picks the better one (or a tie, with an optional note) and the choice is appended to a jsonl that
`megaflow train rm|dpo` read as prompt/chosen/rejected pairs.

    megaflow label --models CKPT_A CKPT_B --prompts FILE --out prefs.jsonl [--port 8765] [--host 0.0.0.0]
    megaflow label --report prefs.jsonl

How it works:
- the prompts are read first (one line naming the file and line on bad JSON); both checkpoints are loaded
  before the port is bound (a checkpoint that does not load, or a port in use, is one line);
- a background thread generates both models' greedy answers in batches ahead of the person, so the page
  never waits on a model (`Labeller.ready`);
- each item's left/right order is random (seeded by the item's index: a reload shows the same order);
  the record stores the choice undone to A/B: `chosen` is the picked model's answer whatever side it was on;
- the file is the state: at start, items already in it are skipped (resume); undo removes its last record
  (the file rewritten atomically); a tie is recorded with `tie: true`, and the preference readers skip it;
- the server answers only requests from this machine (127.0.0.1 / ::1) unless `--host` is given, and
  model output reaches the page escaped (html.escape server-side, textContent in the page's script).
"""

from __future__ import annotations

import html
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from megaflow.errors import DataError, UserError

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a jsonl or parquet file (`prompt` strings, or `messages` whose last user turn is taken;
    megaflow.data.readers.iter_records, bad lines naming FILE:LINE) or of a text file, one per line."""
    from megaflow.data.readers import input_format, iter_records

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if input_format(path) == "text":
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    else:
        prompts = []
        for where, rec in iter_records(path):
            users = [m for m in rec.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
            if isinstance(rec.get("prompt"), str):
                prompts.append(rec["prompt"])
            elif users:
                prompts.append(users[-1]["content"])
            else:
                raise DataError(f"{where}: no `prompt` string (or `messages` with a user turn)")
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def read_labels(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


def swapped(item: int, seed: int) -> bool:
    """Whether model B's answer is shown on the left for this item (a fair coin, fixed per item)."""
    return random.Random(seed * 1_000_003 + item).random() < 0.5


@dataclass
class Labeller:
    """The labelling session: prompts, the two answers per item (filled by a generator thread), and the
    output file (the session's state)."""

    prompts: list[str]
    answer: Callable[[list[str]], tuple[list[str], list[str]]]  # prompts -> (A's answers, B's answers)
    out: Path
    names: tuple[str, str]
    seed: int = 0
    batch: int = 8
    labeller: str = ""
    answers: dict[int, tuple[str, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ready: threading.Condition = field(init=False)
    error: str | None = None

    def __post_init__(self):
        self.ready = threading.Condition(self.lock)

    # -- state -------------------------------------------------------------------------------------------

    def done(self) -> set[int]:
        return {int(r["item"]) for r in read_labels(self.out) if "item" in r}

    def pending(self) -> list[int]:
        done = self.done()
        return [i for i in range(len(self.prompts)) if i not in done]

    def start(self) -> threading.Thread:
        """Generate the pending items' answers, `batch` at a time, in the background."""
        def work():
            try:
                todo = self.pending()
                for start in range(0, len(todo), self.batch):
                    items = todo[start:start + self.batch]
                    a, b = self.answer([self.prompts[i] for i in items])
                    with self.ready:
                        self.answers.update({i: (x, y) for i, x, y in zip(items, a, b)})
                        self.ready.notify_all()
            except Exception as e:  # shown on the page and in the terminal, not swallowed
                with self.ready:
                    self.error = f"{type(e).__name__}: {e}"
                    self.ready.notify_all()

        thread = threading.Thread(target=work, name="label-generate", daemon=True)
        thread.start()
        return thread

    def current(self, timeout: float = 600.0) -> dict:
        """The next unlabelled item with both answers in page order, waiting for the generator if needed."""
        pending = self.pending()
        total = len(self.prompts)
        if not pending:
            return {"done": True, "progress": {"done": total, "total": total}}
        item = pending[0]
        with self.ready:
            self.ready.wait_for(lambda: item in self.answers or self.error is not None, timeout=timeout)
            if self.error is not None:
                return {"error": self.error}
            a, b = self.answers[item]
        left, right = (b, a) if swapped(item, self.seed) else (a, b)
        return {"item": item, "prompt": self.prompts[item], "left": left, "right": right,
                "progress": {"done": total - len(pending), "total": total}}

    def choose(self, item: int, pick: str, note: str = "") -> None:
        """Record `pick` (left | right | tie) for `item`, undoing the page's left/right order."""
        if pick not in ("left", "right", "tie"):
            raise ValueError(f"pick must be left, right or tie, got {pick!r}")
        with self.lock:
            if item not in self.answers or item in self.done():
                raise ValueError(f"item {item} is not waiting for a label")
            a, b = self.answers[item]
            b_left = swapped(item, self.seed)
            winner = "tie" if pick == "tie" else ("B" if (pick == "left") == b_left else "A")
            chosen, rejected = (b, a) if winner == "B" else (a, b)
            record = {"prompt": self.prompts[item], "chosen": chosen, "rejected": rejected, "tie": winner == "tie",
                      "choice": winner, "note": note, "model_a": self.names[0], "model_b": self.names[1],
                      "left": "B" if b_left else "A", "labeller": self.labeller,
                      "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "item": item}
            with open(self.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def undo(self) -> int | None:
        """Remove the last record (the file rewritten atomically); returns its item, or None."""
        with self.lock:
            records = read_labels(self.out)
            if not records:
                return None
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]), encoding="utf-8")
            os.replace(tmp, self.out)
            return int(records[-1].get("item", -1))


# --- the page ----------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>megaflow label</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
#prompt {{ background: #f3f3f3; padding: 1em; white-space: pre-wrap; border-radius: 6px; }}
.pair {{ display: flex; gap: 1em; margin: 1em 0; }}
.side {{ flex: 1; border: 1px solid #ccc; border-radius: 6px; padding: 1em; white-space: pre-wrap; min-height: 6em; }}
button {{ font-size: 1em; padding: .5em 1.2em; margin-right: .5em; }}
#progress {{ color: #666; }} kbd {{ border: 1px solid #aaa; border-radius: 3px; padding: 0 .3em; }}
</style></head><body>
<h1>Which answer is better?</h1>
<p id="progress">{progress}</p>
<div id="prompt">{prompt}</div>
<div class="pair"><div class="side" id="left">{left}</div><div class="side" id="right">{right}</div></div>
<p><button id="pick-left">Left is better <kbd>1</kbd></button><button id="pick-tie">Tie <kbd>3</kbd></button>
<button id="pick-right">Right is better <kbd>2</kbd></button><button id="undo">Undo <kbd>u</kbd></button></p>
<p><input id="note" size="80" placeholder="optional note (n to focus)"></p>
<p id="status"></p>
<script>
let item = {item};
function show(d) {{
  const $ = (id) => document.getElementById(id);
  if (d.error) {{ $("status").textContent = "error: " + d.error; return; }}
  if (d.done) {{ item = null; $("prompt").textContent = "All done: every prompt is labelled.";
    $("left").textContent = ""; $("right").textContent = ""; }}
  else {{ item = d.item; $("prompt").textContent = d.prompt; $("left").textContent = d.left;
    $("right").textContent = d.right; }}
  $("progress").textContent = d.progress.done + " of " + d.progress.total + " labelled";
  $("note").value = "";
}}
async function post(path, body) {{
  const r = await fetch(path, {{method: "POST", headers: {{"Content-Type": "application/json"}}, body: JSON.stringify(body)}});
  const d = await r.json();
  if (!r.ok) {{ document.getElementById("status").textContent = d.error; return; }}
  document.getElementById("status").textContent = d.message || "";
  show(d.next);
}}
function pick(p) {{ if (item !== null) post("/api/choose", {{item: item, pick: p, note: document.getElementById("note").value}}); }}
document.getElementById("pick-left").onclick = () => pick("left");
document.getElementById("pick-right").onclick = () => pick("right");
document.getElementById("pick-tie").onclick = () => pick("tie");
document.getElementById("undo").onclick = () => post("/api/undo", {{}});
document.addEventListener("keydown", (e) => {{
  if (document.activeElement === document.getElementById("note")) {{ if (e.key === "Escape") e.target.blur(); return; }}
  if (e.key === "1" || e.key === "ArrowLeft") pick("left");
  else if (e.key === "2" || e.key === "ArrowRight") pick("right");
  else if (e.key === "3" || e.key === "t") pick("tie");
  else if (e.key === "u") post("/api/undo", {{}});
  else if (e.key === "n") {{ e.preventDefault(); document.getElementById("note").focus(); }}
}});
</script></body></html>
"""


def render_page(state: dict) -> str:
    """The page with the current item in it; every model-made string escaped."""
    esc = html.escape
    if "error" in state:
        return PAGE.format(progress="", prompt=esc("error: " + state["error"]), left="", right="", item="null")
    p = state["progress"]
    progress = f"{p['done']} of {p['total']} labelled"
    if state.get("done"):
        return PAGE.format(progress=progress, prompt="All done: every prompt is labelled.", left="", right="", item="null")
    return PAGE.format(progress=progress, prompt=esc(state["prompt"]), left=esc(state["left"]), right=esc(state["right"]),
                       item=int(state["item"]))


def make_handler(session: Labeller, allow_remote: bool):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # quiet: one line per choice is printed by the session
            pass

        def _allowed(self) -> bool:
            if allow_remote or self.client_address[0] in LOOPBACK:
                return True
            self._send(403, {"error": "megaflow label answers only this machine (start it with --host to allow others)"})
            return False

        def _send(self, code: int, body, content_type: str = "application/json"):
            data = (json.dumps(body) if content_type == "application/json" else body).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", content_type + "; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if not self._allowed():
                return
            if self.path in ("/", "/index.html"):
                self._send(200, render_page(session.current()), "text/html")
            elif self.path == "/api/next":
                self._send(200, session.current())
            else:
                self._send(404, {"error": f"no such page: {self.path}"})

        def do_POST(self):
            if not self._allowed():
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/choose":
                    session.choose(int(body["item"]), str(body["pick"]), str(body.get("note", "")))
                    message = f"item {body['item']}: {body['pick']}"
                elif self.path == "/api/undo":
                    undone = session.undo()
                    message = "nothing to undo" if undone is None else f"undid item {undone}"
                else:
                    self._send(404, {"error": f"no such endpoint: {self.path}"})
                    return
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": str(e)})
                return
            print(f"label: {message}", flush=True)
            self._send(200, {"message": message, "next": session.current()})

    return Handler


def serve(session: Labeller, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False,
          on_ready: Callable[[str], None] = print) -> ThreadingHTTPServer:
    """Bind (a port in use is a UserError), start generating, and return the server (call serve_forever)."""
    try:
        server = ThreadingHTTPServer((host, port), make_handler(session, allow_remote))
    except OSError as e:
        raise UserError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); "
                        "is another server using it? pick another with --port") from None
    session.start()
    on_ready(f"label: http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{server.server_port}/ "
             f"({len(session.pending())} of {len(session.prompts)} prompts to label -> {session.out}); Ctrl-C to stop")
    return server


def model_answers(ckpt_a: str, ckpt_b: str, max_new_tokens: int = 128) -> Callable[[list[str]], tuple[list[str], list[str]]]:
    """Load both checkpoints (a checkpoint that does not load is a UserError) and return prompts -> greedy
    answers of each in its own chat template."""
    from megaflow.data.chat import ChatTemplate, chat_tokenizer
    from megaflow.data.sft import SFTDataOptions
    from megaflow.inference import load_for_inference
    from megaflow.inference.generate import SamplingParams, generate
    from megaflow.models.weights import stored_config

    loaded = []
    for ckpt in (ckpt_a, ckpt_b):
        if not (Path(ckpt) / "megaflow.json").is_file():
            raise UserError(f"--models {ckpt}: not a megaflow final checkpoint (no megaflow.json)")
        model = load_for_inference(ckpt)
        if model.meta.get("head", "lm") != "lm":
            raise UserError(f"--models {ckpt}: a reward model; label answers of language models")
        tokenizer, source, _ = chat_tokenizer(model.tokenizer, SFTDataOptions.from_config(stored_config(ckpt).data.sft).chat_template)
        loaded.append((model, ChatTemplate(tokenizer, source)))
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)

    def answer(prompts: list[str]) -> tuple[list[str], list[str]]:  # called in the generator thread
        from megaflow.runtime import cpu

        out = []
        with cpu.in_this_thread():
            for model, template in loaded:
                ids = [template.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
                out.append([c.text for c in generate(model, ids, params)])
        return out[0], out[1]

    return answer


def report(path: str | Path, z: float = 1.96) -> dict:
    """Model A's win rate over B in a labels file, ties counting half, with a Wilson interval
    (megaflow.eval.compare.win_rate)."""
    from megaflow.eval.compare import win_rate

    records = [r for r in read_labels(path) if r.get("choice") in ("A", "B", "tie")]
    if not records:
        raise DataError(f"{path}: no labels (records with choice A, B or tie)")
    a = [1.0 if r["choice"] == "A" else 0.5 if r["choice"] == "tie" else 0.0 for r in records]
    out = win_rate(a, [0.5] * len(a), z)
    names = {(r.get("model_a"), r.get("model_b")) for r in records}
    return out | {"a_wins": sum(r["choice"] == "A" for r in records), "b_wins": sum(r["choice"] == "B" for r in records),
                  "ties": sum(r["choice"] == "tie" for r in records), "models": sorted(map(list, names))}
