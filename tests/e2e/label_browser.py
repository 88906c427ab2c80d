"""Drive `megaflow label`'s page in a headless Chromium: Qt WebEngine (Chromium 1xx, from the PyQt6-WebEngine
wheel: no browser download), with real mouse clicks and key presses delivered to the page's widget.

    python tests/e2e/label_browser.py URL ACTIONS_JSON

ACTIONS_JSON is a list of steps; each prints one JSON line with the page as it was before the step
(`progress`, `prompt`, `left`, `right`, `note`) and, for a step that changes the progress, waits until it
has changed:

    {"click": "pick-left"}       a left click in the middle of the element with that id
    {"key": "2"}                 one key press (a character), after a click on the page's progress line
    {"note": "text"}             press n, type the text into the note field, then Escape
    {"reload": true}             reload the page (the server resumes from its file)
    {"screenshot": "PATH"}       save the window as a PNG

Run as a subprocess (the Qt application wants a process of its own). Exit 0 when every step ran.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")  # Chromium's sandbox refuses to run as root
os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--disable-gpu")

from PyQt6.QtCore import QEventLoop, QPoint, Qt, QTimer, QUrl
from PyQt6.QtTest import QTest
from PyQt6.QtWebEngineWidgets import QWebEngineView
from PyQt6.QtWidgets import QApplication

FIRST_ITEM_TIMEOUT = 300.0  # the first item waits for both models' first batch of answers
TIMEOUT = 60.0


def pump(ms: int) -> None:
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def js(view: QWebEngineView, expr: str):
    box, loop = [], QEventLoop()
    view.page().runJavaScript(expr, lambda r: (box.append(r), loop.quit()))
    loop.exec()
    return box[0]


def wait_for(what: str, check, timeout: float = TIMEOUT):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if value := check():
            return value
        pump(50)
    raise SystemExit(f"label_browser: timed out waiting for {what}")


def page_state(view: QWebEngineView) -> dict:
    return json.loads(js(view, "JSON.stringify({progress: document.getElementById('progress').textContent, "
                               "prompt: document.getElementById('prompt').textContent, "
                               "left: document.getElementById('left').textContent, "
                               "right: document.getElementById('right').textContent, "
                               "note: document.getElementById('note').value})"))


def load(view: QWebEngineView, url: str | None) -> None:
    loop = QEventLoop()
    view.loadFinished.connect(loop.quit)
    view.load(QUrl(url)) if url else view.reload()
    loop.exec()
    view.loadFinished.disconnect(loop.quit)
    wait_for("the page's item", lambda: js(view, "document.getElementById('prompt').textContent.length > 0"),
             FIRST_ITEM_TIMEOUT)


def click(view: QWebEngineView, element_id: str) -> None:
    rect = json.loads(js(view, f"JSON.stringify(document.getElementById({element_id!r}).getBoundingClientRect())"))
    point = QPoint(int(rect["x"] + rect["width"] / 2), int(rect["y"] + rect["height"] / 2))
    QTest.mouseClick(view.focusProxy(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, point)


def focus_page(view: QWebEngineView) -> None:
    """Click on the progress line (no handler there), as a person clicks into the window before typing: after
    a reload the page does not always have the keyboard focus yet."""
    click(view, "progress")
    wait_for("the page's keyboard focus", lambda: js(view, "document.hasFocus() && document.activeElement === document.body"))


def main(url: str, actions: list[dict]) -> int:
    app = QApplication(sys.argv[:1])
    view = QWebEngineView()
    view.resize(1100, 640)
    view.show()
    load(view, url)
    view.focusProxy().setFocus()
    for action in actions:
        before = page_state(view)
        print(json.dumps({"action": action, "before": before}), flush=True)
        if "reload" in action:
            load(view, None)
            view.focusProxy().setFocus()
            continue
        if "screenshot" in action:
            view.grab().save(action["screenshot"])
            continue
        if "note" in action:
            focus_page(view)
            QTest.keyClick(view.focusProxy(), "n")
            wait_for("the note field's focus", lambda: js(view, "document.activeElement.id === 'note'"))
            QTest.keyClicks(view.focusProxy(), action["note"])
            wait_for("the typed note", lambda text=action["note"]: js(view, "document.getElementById('note').value") == text)
            QTest.keyClick(view.focusProxy(), Qt.Key.Key_Escape)
            continue
        if "click" in action:
            click(view, action["click"])
        else:
            focus_page(view)
            QTest.keyClick(view.focusProxy(), action["key"])
        old = before["progress"]
        wait_for(f"the progress to move after {action}", lambda old=old: page_state(view)["progress"] != old)
    print(json.dumps({"action": "end", "before": page_state(view)}), flush=True)
    view.close()
    app.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2])))
