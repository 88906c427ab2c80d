"""`megaflow label`'s session and server (megaflow.eval.label) over HTTP, with stand-in models: choices by
page side land as the right model's answer, undo and reload, resume, ties, escaping, localhost only, a port
in use, bad prompt files, and the win-rate report."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from megaflow.errors import DataError, UserError
from megaflow.eval import label

PROMPTS = [f"question {i}" for i in range(6)] + ["<b>bold</b> & <script>alert('prompt')</script>"]


def answers(prompts):  # model A and model B, recognisable in every record
    return [f"A answers {p}" for p in prompts], [f"B answers {p} <script>alert('x')</script>" for p in prompts]


@pytest.fixture
def server(tmp_path):
    made = []

    def start(out: Path | None = None, host: str = "127.0.0.1", allow_remote: bool = False, port: int = 0):
        session = label.Labeller(PROMPTS, answers, out or tmp_path / "prefs.jsonl", ("ckpt-a", "ckpt-b"), seed=3, batch=2)
        srv = label.serve(session, host, port, allow_remote, on_ready=lambda m: None)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        made.append(srv)
        return session, f"http://127.0.0.1:{srv.server_port}"

    yield start
    for srv in made:
        srv.shutdown()
        srv.server_close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_choices_undo_reload_and_resume_land_as_the_picked_models_answers(server, tmp_path):
    session, url = server()
    picks = {}
    state = json.loads(_get(url + "/api/next"))
    for pick in ["left", "right", "tie", "left"]:
        picks[state["item"]] = (pick, state)
        state = _post(url + "/api/choose", {"item": state["item"], "pick": pick, "note": f"n{state['item']}"})["next"]
    undone = _post(url + "/api/undo", {})  # the last choice (item 3) goes
    assert undone["message"] == "undid item 3" and undone["next"]["item"] == 3
    shown3 = picks.pop(3)[1]
    state = json.loads(_get(url + "/api/next"))  # a reload shows item 3 again, in the same order
    assert state["item"] == 3 and (state["left"], state["right"]) == (shown3["left"], shown3["right"])
    for pick in ["right", "right"]:
        picks[state["item"]] = (pick, state)
        state = _post(url + "/api/choose", {"item": state["item"], "pick": pick})["next"]
    records = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert [r["item"] for r in records] == [0, 1, 2, 3, 4]
    sides = {r["left"] for r in records}
    assert sides == {"A", "B"}  # the order really is randomised
    for r in records:
        pick, shown = picks[r["item"]]
        shown_model = "tie" if pick == "tie" else "A" if shown[pick].startswith("A answers") else "B"
        assert r["choice"] == shown_model and r["tie"] == (pick == "tie")
        if pick != "tie":  # the picked side's text is `chosen`, whichever model sat there
            assert r["chosen"] == shown[pick] and r["rejected"] == shown["right" if pick == "left" else "left"]
        assert r["prompt"] == PROMPTS[r["item"]] and (r["model_a"], r["model_b"]) == ("ckpt-a", "ckpt-b")
        assert r["left"] == ("A" if shown["left"].startswith("A answers") else "B") and r["timestamp"]
    assert records[0]["note"] == "n0"
    # resume: a new session on the same file starts at the first unlabelled prompt
    session2, url2 = server(tmp_path / "prefs.jsonl")
    assert json.loads(_get(url2 + "/api/next"))["item"] == 5 and session2.pending() == [5, 6]
    # bad requests are answered, not crashed on
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(url2 + "/api/choose", {"item": 0, "pick": "left"})  # already labelled
    assert e.value.code == 400


def test_model_output_reaches_the_page_escaped(server):
    session, url = server()
    for _ in range(6):  # to the last prompt, whose text is HTML too
        state = json.loads(_get(url + "/api/next"))
        _post(url + "/api/choose", {"item": state["item"], "pick": "left"})
    page = _get(url + "/")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "<script>alert('x')" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp;" in page and "<b>bold</b>" not in page
    assert "innerHTML" not in page and "textContent" in page  # later items go in as text too
    assert 'id="pick-left"' in page and 'e.key === "u"' in page  # buttons and keyboard shortcuts


def _outward_ip() -> str | None:
    """This machine's address on its first non-loopback interface (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.254.254.254", 1))
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") else ip


def test_only_this_machine_is_answered_unless_host_is_given(server):
    ip = _outward_ip()
    assert ip, "this test needs a non-loopback interface"
    _, url = server(host="0.0.0.0", allow_remote=False)
    port = url.rsplit(":", 1)[1]
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(f"http://{ip}:{port}/api/next")
    assert e.value.code == 403 and "--host" in e.value.read().decode()
    assert json.loads(_get(url + "/api/next"))["item"] == 0  # loopback is answered
    _, url = server(host="0.0.0.0", allow_remote=True)
    assert json.loads(_get(f"http://{ip}:{url.rsplit(':', 1)[1]}/api/next"))["item"] == 0


def test_a_port_in_use_is_one_clear_error(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        session = label.Labeller(PROMPTS, answers, tmp_path / "p.jsonl", ("a", "b"))
        with pytest.raises(UserError, match=rf"--port {taken.getsockname()[1]}: cannot listen"):
            label.serve(session, "127.0.0.1", taken.getsockname()[1], on_ready=lambda m: None)
    finally:
        taken.close()


def test_prompt_files_and_the_report(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "hello"}]}\n')
    assert label.read_prompt_file(good) == ["hi", "hello"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        label.read_prompt_file(bad)
    bad.write_text('{"text": "no prompt here"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no `prompt`"):
        label.read_prompt_file(bad)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"choice": c, "model_a": "a", "model_b": "b"}) + "\n"
                              for c in ["A", "A", "A", "B", "B", "tie"]))
    r = label.report(labels)
    assert (r["a_wins"], r["b_wins"], r["ties"], r["n"]) == (3, 2, 1, 6)
    assert r["win_rate"] == pytest.approx(3.5 / 6) and r["win_rate_low"] < r["win_rate"] < r["win_rate_high"]
