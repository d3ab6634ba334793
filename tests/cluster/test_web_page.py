"""The web page in a real headless browser (Debian's chromium and chromedriver,
through selenium) against a real three-node cluster with auth on.

Sagas are submitted with sagactl, as a user would; the page must show them live
(a saga turns green without a reload), show the compensations of one refused by
Car, refuse Abort to a client token and carry it out for an operator's, resolve a
stuck compensation, and keep working while the leader is killed. A screenshot of
each state is kept in $SAGA_ARTIFACTS (default test-artifacts/web). Ends with the
saga guarantee at the participants and identical replicas.

Without chromium the test skips, unless SAGA_REQUIRE_BROWSER=1 (set by .ci/run,
which installs it): then it fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from google.protobuf import json_format
from saga.v1 import log_pb2, sagas_pb2

from cluster.client.saga_client import SagaClient
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants, travel_definition
from coordinator.core import request_key

pytestmark = pytest.mark.cluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = os.environ.get(
    "SAGA_ARTIFACTS",
    os.path.join(os.path.dirname(__file__), "..", "..", "test-artifacts", "web"),
)
WAIT_S = 30
GREEN = "#16a34a"

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("SAGA_REQUIRE_BROWSER") == "1":
        raise RuntimeError("SAGA_REQUIRE_BROWSER=1 but chromium or chromedriver is missing")
    pytest.skip(
        "no chromium/chromedriver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402 (only with a browser to drive)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    base = str(tmp_path_factory.mktemp("web"))
    with LocalCluster(base, nodes=3, auth=True, http=True).running() as c:
        yield c


@pytest.fixture(scope="module")
def participants(tmp_path_factory, cluster) -> Iterator[dict[str, TravelParticipants]]:
    """The travel services (Car refuses sagas whose id holds "nocar"), a Payment
    that takes 6 s (to catch sagas running), and a Hotel whose compensations
    always fail (to get one stuck)."""
    base = tmp_path_factory.mktemp("web-parts")
    sets = {
        "travel": TravelParticipants(
            str(base / "travel"), extra_args={"Car": ["--refuse-saga-substring", "nocar"]}
        ),
        "slow": TravelParticipants(
            str(base / "slow"),
            services=("Payment",),
            extra_args={"Payment": ["--latency-ms", "6000"]},
        ),
        "stuck": TravelParticipants(
            str(base / "stuck"),
            services=("Hotel",),
            extra_args={"Hotel": ["--compensate-error-rate", "1"]},
        ),
    }
    started = []
    try:
        for parts in sets.values():
            parts.start_all()
            started.append(parts)
        for parts in sets.values():
            parts.wait_ready(20)
        yield sets
    finally:
        for parts in started:
            parts.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = Options()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The browser on one node's web page, and sagactl beside it."""

    def __init__(self, driver, cluster: LocalCluster, node: str, tmp: str) -> None:
        self.driver = driver
        self.cluster = cluster
        self.base = f"http://{cluster.specs[node].http_addr}"
        self.tmp = tmp
        os.makedirs(ARTIFACTS, exist_ok=True)

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def use_token(self, role: str) -> None:
        box = self.driver.find_element(By.ID, "token")
        box.clear()
        box.send_keys(self.cluster.tokens[role])
        self.driver.find_element(By.CSS_SELECTOR, "#token-form button").click()

    def wait(self, condition, what: str, timeout_s: float = WAIT_S):
        try:
            return WebDriverWait(self.driver, timeout_s, poll_frequency=0.1).until(
                lambda d: condition()
            )
        except Exception:
            self.shot("failed-" + what.replace(" ", "-"))
            raise AssertionError(
                f"the page never showed {what}; console: {self.driver.get_log('browser')}"
            ) from None

    def attr(self, css: str, name: str) -> str | None:
        """Read in one script: the page re-renders on every record, and an element
        found in one call may be gone by the next."""
        return self.driver.execute_script(
            "const e = document.querySelector(arguments[0]);"
            "return e ? e.getAttribute(arguments[1]) : null;",
            css,
            name,
        )

    def all(self, css: str, name: str) -> list[str]:
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]),"
            " e => arguments[1] ? e.getAttribute(arguments[1]) : e.textContent);",
            css,
            name,
        )

    def saga_state(self) -> str | None:
        return self.attr("#saga-state", "data-state")

    def vertex_states(self) -> dict[str, str]:
        pairs = self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#dag g.vertex'),"
            " g => [g.dataset.vertex, g.dataset.state]);"
        )
        return dict(pairs)

    def problem(self) -> str:
        return self.driver.execute_script(
            "const b = document.getElementById('problem'); return b.hidden ? '' : b.textContent;"
        )

    def answer_prompt(self, button: str, answer: str) -> None:
        """Click a button that asks for a reason, and give it. The click runs after
        the script returns (a prompt would block it), on the element as it is then."""
        self.wait(lambda: self.attr(button, "hidden") is None, f"the button {button}")
        self.driver.execute_script(
            "setTimeout(() => document.querySelector(arguments[0]).click(), 0);", button
        )
        alert = WebDriverWait(self.driver, WAIT_S).until(lambda d: d.switch_to.alert)
        alert.send_keys(answer)
        alert.accept()

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(os.path.join(ARTIFACTS, f"{name}.png"))

    def sagactl_submit(self, definition: log_pb2.SagaDefinition, saga_id: str) -> None:
        path = os.path.join(self.tmp, f"{saga_id}.json")
        with open(path, "w") as f:
            json.dump(json_format.MessageToDict(definition), f)
        token = os.path.join(self.tmp, "client.token")
        with open(token, "w") as f:
            f.write(self.cluster.tokens["client"])
        addrs = ",".join(s.grpc_addr for s in self.cluster.specs.values())
        sagactl = os.path.join(os.path.dirname(sys.executable), "sagactl")
        done = subprocess.run(
            [sagactl, "saga", "submit", path, "--id", saga_id, "--addr", addrs,
             "--token-file", token, "--payload", '{"to": "Lisbon"}'],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


def _definitions(participants) -> dict[str, log_pb2.SagaDefinition]:
    travel = participants["travel"].endpoints
    slow = travel_definition(
        {**travel, "Payment": participants["slow"].endpoints["Payment"]}, timeout_ms=15_000
    )
    stuck = travel_definition({**travel, "Hotel": participants["stuck"].endpoints["Hotel"]})
    return {"travel": travel_definition(travel), "slow": slow, "stuck": stuck}


def test_the_saga_page_follows_sagas_live_through_a_leader_kill(
    cluster, participants, browser, tmp_path
) -> None:
    leader = cluster.leader_id()
    follower = next(n for n in cluster.specs if n != leader)
    page = Page(browser, cluster, follower, str(tmp_path))
    defs = _definitions(participants)
    submitted: dict[str, str] = {}  # saga id -> definition key

    def submit_and_open(kind: str, saga_id: str) -> None:
        """Submit with sagactl, as a user would, and open the saga's page."""
        page.sagactl_submit(defs[kind], saga_id)
        submitted[saga_id] = kind
        page.open(f"/sagas/{saga_id}")

    # Auth is on: no token, no data, and the page says why.
    page.open("/")
    page.wait(lambda: "token" in page.problem(), "the token request")
    page.use_token("client")
    page.wait(lambda: page.attr(f'#nodes tr[data-node="{leader}"]', "data-role") == "leader",
              "the leader in the cluster table")  # fmt: skip
    page.shot("1-cluster")

    # A saga submitted from sagactl, watched live: Payment takes 6 s, so the page
    # sees it running, then turns green without a reload.
    submit_and_open("slow", "web-live")
    page.wait(lambda: page.vertex_states().get("Payment") == "STARTED", "Payment started")
    assert page.saga_state() == "RUNNING"
    page.shot("2-running")
    page.wait(lambda: page.saga_state() == "COMPLETED", "the saga completed")
    assert set(page.vertex_states().values()) == {"DONE"}
    assert set(page.all("#dag g.vertex rect", "fill")) == {GREEN}
    page.shot("3-completed")

    # Refused by Car: every started vertex compensated, in the timeline too.
    submit_and_open("travel", "web-nocar")
    page.wait(lambda: page.saga_state() == "ABORTED", "the refused saga aborted")
    states = page.vertex_states()
    assert states["Payment"] == "PENDING", states
    assert {states[v] for v in ("Hotel", "Car", "Flight")} == {"COMPENSATED"}, states
    bodies = page.all("#records tbody tr", "data-body")
    assert bodies[0] == "start_saga" and bodies[-1] == "end_saga"
    assert {"fail_t", "abort_saga", "start_c", "end_c"} <= set(bodies), bodies
    assert "nocar" in page.all("#abort-reason", "")[0]
    page.shot("4-compensated")

    # Abort needs the operator role: a client's click is refused and changes nothing.
    submit_and_open("slow", "web-abort")
    page.wait(lambda: page.vertex_states().get("Payment") == "STARTED", "Payment started")
    page.answer_prompt("#abort", "clicked by a client")
    page.wait(lambda: "operator" in page.problem(), "Abort refused to a client")
    page.use_token("operator")
    page.wait(lambda: page.saga_state() == "RUNNING", "the saga page again")
    page.answer_prompt("#abort", "the customer cancelled")
    page.wait(lambda: page.saga_state() == "ABORTED", "the aborted saga")
    assert "the customer cancelled" in page.all("#abort-reason", "")[0]
    page.shot("5-aborted")

    # A compensation that keeps failing: STUCK, then resolved by hand from the page.
    submit_and_open("stuck", "web-stuck-nocar")
    page.wait(lambda: page.vertex_states().get("Hotel") == "VERTEX_STUCK", "Hotel stuck")
    page.shot("6-stuck")
    page.answer_prompt('button.resolve[data-vertex="Hotel"]', "refunded by hand, ticket 42")
    page.wait(lambda: page.saga_state() == "ABORTED", "the resolved saga aborted")
    end_c = page.all('#records tr[data-body="end_c"]', "")
    assert any("ticket 42" in row for row in end_c), end_c

    # The leader dies while the page (on a follower) follows a running saga: the
    # new leader finishes it and the same page, never reloaded, turns green; then
    # the cluster table shows the dead node and the new leader.
    submit_and_open("slow", "web-across-kill")
    page.wait(lambda: page.vertex_states().get("Payment") == "STARTED", "Payment started")
    browser.execute_script("window.notReloaded = true;")
    cluster.kill(leader, signal.SIGKILL)
    page.wait(lambda: page.saga_state() == "COMPLETED", "the saga completed across the kill")
    assert browser.execute_script("return window.notReloaded === true;")
    epochs = {int(e) for e in page.all("#records tbody tr td:nth-child(3)", "")}
    assert len(epochs) >= 2, epochs  # decided by two leaders
    page.shot("7-completed-across-leader-kill")
    new_leader = cluster.wait_for_leader(20).id
    page.open("/")
    page.wait(
        lambda: page.attr(f'#nodes tr[data-node="{leader}"]', "data-role") == "unreachable",
        "the killed leader unreachable",
    )
    page.wait(
        lambda: page.attr(f'#nodes tr[data-node="{new_leader}"]', "data-role") == "leader",
        "the new leader",
    )
    page.open("/")
    page.wait(lambda: len(page.all("#sagas tbody tr", "data-saga")) == len(submitted), "the list")
    search = browser.find_element(By.ID, "search")
    search.send_keys("nocar")  # the search box filters by id as one types
    page.wait(
        lambda: (
            sorted(page.all("#sagas tbody tr", "data-saga")) == ["web-nocar", "web-stuck-nocar"]
        ),
        "the sagas whose id holds nocar",
    )
    page.shot("8-list-search")

    cluster.start(leader)
    cluster.wait_for_leader(20)
    _check_guarantee(cluster, participants, defs, submitted)
    cluster.wait_identical()


def test_the_api_refuses_a_post_that_is_not_json_and_an_unknown_host(cluster, participants) -> None:
    import urllib.error
    import urllib.request

    addr = cluster.specs["n1"].http_addr
    auth = {"Authorization": "Bearer " + cluster.tokens["operator"]}
    form = urllib.request.Request(
        f"http://{addr}/api/sagas/x/abort", data=b"reason=x", headers=auth, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(form, timeout=5)
    assert refused.value.code == 415
    rebound = urllib.request.Request(
        f"http://{addr}/api/cluster", headers={**auth, "Host": "evil.example:80"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebound, timeout=5)
    assert refused.value.code == 421
    unknown = urllib.request.Request(f"http://{addr}/api/sagas/no-such-saga", headers=auth)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unknown, timeout=5)
    assert refused.value.code == 404
    # An id with characters the page escapes (encodeURIComponent) is found all the same.
    addrs = [s.grpc_addr for s in cluster.specs.values()]
    with SagaClient(addrs, token=cluster.tokens["client"]) as client:
        client.submit(_definitions(participants)["travel"], b"{}", "order:1.a-b")
    escaped = urllib.request.Request(f"http://{addr}/api/sagas/order%3A1.a-b", headers=auth)
    with urllib.request.urlopen(escaped, timeout=5) as reply:
        assert json.loads(reply.read())["saga_id"] == "order:1.a-b"


def _check_guarantee(cluster, participants, defs, submitted: dict[str, str]) -> None:
    """Every saga ended; a completed one is in effect at every participant, an
    aborted one nowhere (except a compensation an operator resolved by hand)."""
    addrs = [s.grpc_addr for s in cluster.specs.values()]
    with SagaClient(addrs, token=cluster.tokens["operator"]) as client:
        for saga_id, kind in submitted.items():
            info = client.wait_for_end(saga_id, 60)
            resolved = {
                r.end_c.vertex for r in info.records if r.HasField("end_c") and r.end_c.resolved_by
            }
            for vertex in defs[kind].vertices:
                parts = next(
                    p for p in participants.values()
                    if p.endpoints.get(vertex.name) == vertex.endpoint
                )  # fmt: skip
                bookings = parts.state(vertex.name).bookings_for(request_key(saga_id, vertex.name))
                assert len(bookings) <= 1, (saga_id, vertex.name, bookings)
                in_effect = bool(bookings) and bookings[0].status == "in_effect"
                if info.state == sagas_pb2.COMPLETED:
                    assert in_effect, (saga_id, vertex.name)
                elif vertex.name not in resolved:
                    assert not in_effect, (saga_id, vertex.name, bookings)
