// The cluster view and the saga list, refreshed every second.
"use strict";

const REFRESH_MS = 1000;

async function refreshCluster() {
  const data = await api("/api/cluster");
  document.getElementById("served-by").textContent = "(this page: node " + data.served_by + ")";
  const rows = data.nodes.map((n) =>
    el("tr", { "data-node": n.id, "data-role": n.reachable ? n.role : "unreachable" },
      el("td", {}, n.id),
      el("td", { class: "role" }, n.reachable ? n.role + (n.in_office ? " (in office)" : "") : "unreachable"),
      el("td", {}, n.reachable ? n.term : ""),
      el("td", {}, n.reachable ? n.epoch : ""),
      el("td", {}, n.reachable ? n.commit_index : ""),
      el("td", {}, n.reachable ? n.applied_index : ""),
      el("td", {}, n.reachable ? n.leader_id : ""))
  );
  document.querySelector("#nodes tbody").replaceChildren(...rows);
}

async function refreshSagas() {
  const params = new URLSearchParams({
    q: document.getElementById("search").value.trim(),
    state: document.getElementById("state").value,
  });
  const data = await api("/api/sagas?" + params);
  const rows = data.sagas.map((s) =>
    el("tr", { "data-saga": s.saga_id, "data-state": s.state },
      el("td", {}, el("a", { href: "/sagas/" + encodeURIComponent(s.saga_id) }, s.saga_id)),
      el("td", {}, s.name),
      el("td", {}, badge(s.state)))
  );
  document.querySelector("#sagas tbody").replaceChildren(...rows);
  document.getElementById("list-note").textContent =
    data.next_page_token ? "showing the first " + data.sagas.length + " matches" : "";
}

async function refresh() {
  try {
    await Promise.all([refreshCluster(), refreshSagas()]);
    showProblem(null);
  } catch (e) {
    showProblem(e);
  }
}

setUpTokenForm();
document.getElementById("filter").addEventListener("submit", (e) => e.preventDefault());
document.getElementById("search").addEventListener("input", refresh);
document.getElementById("state").addEventListener("change", refresh);
refresh();
setInterval(refresh, REFRESH_MS);
