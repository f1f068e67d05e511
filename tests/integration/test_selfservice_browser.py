"""The self-service page in a real headless browser (Debian's ``chromium`` and
``chromium-driver``, driven by selenium): the hand-over of the agent's link, the page's
accessibility (every control named, the keyboard reaches every action in order), a
reconnect with more scopes through the real authorization server, a disconnect by keyboard
that revokes upstream, a forged cross-site POST refused and another user's connection id
refused; a screenshot of the page goes to the test artefacts
(``$CREDPROXY_TEST_ARTIFACTS``, default ``test-artifacts/`` in the repository).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from devstack.stack import Stack
from tests.integration.test_scopes_page import READ, WRITE, scoped_stack

pytestmark = pytest.mark.integration

USER = "browser-alice"  # the authorization server's login_hint (it has no login page)
OTHER = "browser-bob"
ARTIFACTS = Path(os.environ.get("CREDPROXY_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[2] / "test-artifacts")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = scoped_stack(tmp_path_factory.mktemp("browser"),
                     authorize_params={"login_hint": USER})
    yield s
    s.close()


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                       else None)
        if found:
            return found
    raise AssertionError(f"none of {names} is installed (apt-get install chromium "
                         "chromium-driver; .ci/run installs them)")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,1400", f"--user-data-dir={tmp_path / 'profile'}",
                "--no-first-run", "--no-proxy-server"):
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the devstack authorization server's test CA
    driver = webdriver.Chrome(options=options,
                              service=Service(_binary("chromedriver", "chromium-driver")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _admin(stack: Stack) -> str:
    return f"http://{stack.config['admin']}"


def _sign_in(stack: Stack, browser: WebDriver, user: str = USER) -> None:
    """Follow the agent's link: the context is handed over once, then the page reloads
    without it."""
    browser.get(f"{_admin(stack)}/connections?"
                f"{httpx2.QueryParams({'context': stack.context(user)})}")
    WebDriverWait(browser, 15).until(
        lambda d: d.title == "Your connections" and "context=" not in d.current_url)


def _section(browser: WebDriver, provider: str) -> object:
    return browser.find_element(By.XPATH, f"//section[h2[normalize-space()='{provider}']]")


def _grant_token(stack: Stack, user: str) -> str | None:
    grant = stack.vault_get(user)
    return None if grant is None else str(grant.tokens.access_token.reveal())


def test_the_page_is_named_keyboard_reachable_and_screenshotted(stack: Stack,
                                                               browser: WebDriver) -> None:
    stack.vault_put(USER, stack.grant(USER))
    _sign_in(stack, browser)
    assert browser.current_url == f"{_admin(stack)}/connections"
    body = browser.find_element(By.TAG_NAME, "main").text
    assert f"Signed in as {USER}." in body
    docs = _section(browser, "docs")
    assert "Connected" in docs.text and READ in docs.text  # type: ignore[attr-defined]
    # The session cookie is not readable by script (HttpOnly).
    assert "credproxy_session" not in browser.execute_script("return document.cookie")

    # Every control a user operates has an accessible name (as the browser computes it).
    controls = [c for c in browser.find_elements(By.CSS_SELECTOR, "input, button, select")
                if c.get_attribute("type") != "hidden"]
    assert controls
    names = {c.get_attribute("id") or c.text: c.accessible_name for c in controls}
    assert all(names.values()), names
    assert {c.accessible_name for c in controls if c.tag_name == "button"} >= {
        "Reconnect docs", "Disconnect docs", "Connect keyed", "Connect wild"}
    box = browser.find_element(By.CSS_SELECTOR, f"input[type=checkbox][value='{WRITE}']")
    assert box.accessible_name == WRITE
    # Grouped under a legend naming the provider (screen readers announce it).
    assert browser.find_element(By.CSS_SELECTOR, "section legend").text == (
        "Scopes to allow for docs")

    # Tab through the page: focus visits every control, in document order.
    browser.get(f"{_admin(stack)}/connections")  # a fresh load: focus starts at the top
    seen: list[str] = []
    for _ in range(len(controls)):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        focused = browser.switch_to.active_element
        seen.append(focused.get_attribute("id") or focused.text)
    controls = [c for c in browser.find_elements(By.CSS_SELECTOR, "input, button, select")
                if c.get_attribute("type") != "hidden"]
    order = [c.get_attribute("id") or c.text for c in controls]
    assert seen == order

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "selfservice-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def test_reconnect_with_more_scopes_then_disconnect_by_keyboard(stack: Stack,
                                                                browser: WebDriver) -> None:
    stack.vault_put(USER, stack.grant(USER))
    _sign_in(stack, browser)
    docs = _section(browser, "docs")
    box = docs.find_element(By.CSS_SELECTOR,  # type: ignore[attr-defined]
                            f"input[value='{WRITE}']")
    assert not box.is_selected()
    box.send_keys(Keys.SPACE)  # by keyboard
    assert box.is_selected()
    docs.find_element(By.XPATH,  # type: ignore[attr-defined]
                      ".//button[normalize-space()='Reconnect docs']").send_keys(Keys.ENTER)
    # To the authorization server and back through the callback.
    WebDriverWait(browser, 20).until(lambda d: d.title == "Connected")
    assert f"granted scopes: {READ} {WRITE}" in browser.find_element(By.TAG_NAME, "p").text
    assert stack.vault_get(USER).tokens.scope == f"{READ} {WRITE}"
    browser.find_element(By.LINK_TEXT, "Your connections").click()
    WebDriverWait(browser, 15).until(lambda d: d.title == "Your connections")
    docs = _section(browser, "docs")
    assert f"{READ} {WRITE}" in docs.text  # type: ignore[attr-defined]

    token = _grant_token(stack, USER)
    assert token is not None and stack.introspect(token)["active"] is True
    button = docs.find_element(By.XPATH,  # type: ignore[attr-defined]
                               ".//button[normalize-space()='Disconnect docs']")
    button.send_keys(Keys.ENTER)
    status = WebDriverWait(browser, 20).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "[role=status]"))
    assert status.text.startswith("Disconnected docs: refresh and access tokens revoked")
    assert "Not connected" in _section(browser, "docs").text  # type: ignore[attr-defined]
    assert stack.vault_get(USER) is None
    assert stack.introspect(token)["active"] is False


class _Attacker(http.server.BaseHTTPRequestHandler):
    """Another origin's page that posts a form to the disconnect URL as soon as it loads."""

    form = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = ("<!doctype html><html><body onload='document.forms[0].submit()'>"
                f"{self.form}</body></html>").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def attacker() -> Iterator[tuple[str, type[_Attacker]]]:
    handler = type("Handler", (_Attacker,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("host", [
    pytest.param("localhost", id="cross-site"),  # another site: no Strict cookie at all
    pytest.param("127.0.0.1", id="same-site-other-origin"),  # the cookie goes; Origin stops it
])
def test_a_forged_cross_site_post_is_refused(stack: Stack, browser: WebDriver,
                                             attacker: tuple[str, type[_Attacker]],
                                             host: str) -> None:
    stack.vault_put(USER, stack.grant(USER))
    token = _grant_token(stack, USER)
    revoked = len(_revocations(stack))
    _sign_in(stack, browser)
    page = browser.page_source
    # The attacker even knows the connection id and the CSRF token (the worst case).
    connection = re.search(r'name="connection" value="([^"]+)"', page)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert connection and csrf
    port, handler = attacker
    handler.form = (f'<form method="post" action="{_admin(stack)}/connections/disconnect">'
                    f'<input name="csrf" value="{csrf.group(1)}">'
                    f'<input name="connection" value="{connection.group(1)}"></form>')
    browser.get(f"http://{host}:{port}/")
    WebDriverWait(browser, 15).until(lambda d: d.current_url.startswith(_admin(stack)))
    WebDriverWait(browser, 15).until(lambda d: d.title in ("Request refused", "Sign-in needed"))
    assert browser.title == "Request refused"
    assert "nothing was changed" in browser.find_element(By.TAG_NAME, "main").text
    assert _grant_token(stack, USER) == token
    assert token is not None and stack.introspect(token)["active"] is True
    assert len(_revocations(stack)) == revoked


def _revocations(stack: Stack) -> list[dict[str, object]]:
    return [r for r in stack.audit_records()
            if r["user"] == USER and r["event"] == "connection.revoked"]


def test_another_users_connection_id_is_refused(stack: Stack, browser: WebDriver) -> None:
    stack.vault_put(USER, stack.grant(USER))
    stack.vault_put(OTHER, stack.grant(OTHER))
    theirs = _grant_token(stack, OTHER)
    mine = _grant_token(stack, USER)
    # Bob's id, from Bob's own page.
    _sign_in(stack, browser, OTHER)
    other_id = browser.find_element(
        By.CSS_SELECTOR, "form[action='/connections/disconnect'] input[name=connection]"
    ).get_attribute("value")
    browser.delete_all_cookies()
    _sign_in(stack, browser, USER)
    form = browser.find_element(By.CSS_SELECTOR, "form[action='/connections/disconnect']")
    browser.execute_script("arguments[0].querySelector('[name=connection]').value = "
                           "arguments[1]", form, other_id)
    form.find_element(By.TAG_NAME, "button").send_keys(Keys.ENTER)
    alert = WebDriverWait(browser, 15).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "[role=alert]"))
    assert alert.text == "No connection of yours has that id; nothing was changed."
    assert OTHER not in browser.find_element(By.TAG_NAME, "main").text
    assert (_grant_token(stack, OTHER), _grant_token(stack, USER)) == (theirs, mine)
    assert theirs is not None and stack.introspect(theirs)["active"] is True
