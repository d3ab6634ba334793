"""The shard map (which group holds a saga), the merge of List pages across groups,
and the client's routes."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from saga.v1 import sagas_pb2

from cluster.client.routing import Routes
from cluster.runtime.config import NodeConfig, Peer, shard_of
from cluster.runtime.groups import merge_pages
from cluster.shardmap import HASH_SPACE, Group, ShardMap, saga_hash

NODES = [[f"127.0.0.1:{9000 + 10 * g + n}" for n in range(3)] for g in range(3)]


def test_the_hash_is_the_documented_one() -> None:
    # Fixed vectors: clients in other languages route with the same rule (the first
    # four bytes of SHA-256 of the UTF-8 id, big-endian); changing it moves sagas.
    assert saga_hash("saga-1") == 368814494
    assert saga_hash("abc") == 3128432319
    assert saga_hash("") == 3820012610


@given(groups=st.integers(1, 64), saga_id=st.text(max_size=40))
def test_every_saga_belongs_to_exactly_one_group(groups: int, saga_id: str) -> None:
    shard_map = ShardMap.even([[f"10.0.0.{g}:1"] for g in range(groups)])
    owners = [g.index for g in shard_map.groups if g.owns(saga_id)]
    assert owners == [shard_map.group_of(saga_id).index]
    sizes = [g.hash_end - g.hash_start for g in shard_map.groups]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == HASH_SPACE


def test_an_even_map_spreads_sagas_evenly() -> None:
    shard_map = ShardMap.even(NODES)
    counts = [0, 0, 0]
    for k in range(3000):
        counts[shard_map.group_of(f"trip-{k}").index] += 1
    assert all(900 < c < 1100 for c in counts), counts


def test_the_map_survives_its_file_and_the_wire() -> None:
    shard_map = ShardMap.even(NODES)
    assert ShardMap.from_json(shard_map.to_json()) == shard_map
    reply = shard_map.to_reply(shard_map.groups[1])
    assert reply.group == 1
    assert ShardMap.from_reply(reply) == shard_map
    assert shard_map.group_with(NODES[2][1]) == shard_map.groups[2]
    assert shard_map.group_with("127.0.0.1:1") is None


def _doc(groups: list[dict]) -> str:
    return json.dumps({"groups": groups})


@pytest.mark.parametrize(
    "text, error",
    [
        ("not json", "not a map"),
        (_doc([]), "1 to 64 groups"),
        (_doc([{"group": 0, "hash_start": 0, "hash_end": 10, "nodes": ["a:1"]}]), "ranges end"),
        (
            _doc(
                [
                    {"group": 0, "hash_start": 0, "hash_end": 10, "nodes": ["a:1"]},
                    {"group": 1, "hash_start": 9, "hash_end": HASH_SPACE, "nodes": ["b:1"]},
                ]
            ),
            "must start at 10",
        ),
        (
            _doc(
                [
                    {"group": 1, "hash_start": 0, "hash_end": 10, "nodes": ["a:1"]},
                    {"group": 0, "hash_start": 10, "hash_end": HASH_SPACE, "nodes": ["b:1"]},
                ]
            ),
            "numbered 0, 1",
        ),
        (
            _doc(
                [
                    {"group": 0, "hash_start": 0, "hash_end": 10, "nodes": ["a:1"]},
                    {"group": 1, "hash_start": 10, "hash_end": HASH_SPACE, "nodes": ["a:1"]},
                ]
            ),
            "in two groups",
        ),
        (_doc([{"group": 0, "hash_start": 0, "hash_end": HASH_SPACE, "nodes": []}]), "no nodes"),
        (
            _doc([{"group": 0, "hash_start": 0, "hash_end": HASH_SPACE, "nodes": ["a"]}]),
            "HOST:PORT",
        ),
        (_doc([{"group": "0", "hash_start": 0, "hash_end": HASH_SPACE, "nodes": ["a:1"]}]), "map"),
    ],
)
def test_a_bad_map_is_refused_with_its_reason(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ShardMap.from_json(text)


def _config(tmp_path, grpc_addr: str, peers: list[str], shard_map: ShardMap | None):
    path = None
    if shard_map is not None:
        path = tmp_path / "shards.json"
        path.write_text(shard_map.to_json())
    return NodeConfig(
        id="n1",
        raft_addr="127.0.0.1:1",
        grpc_addr=grpc_addr,
        data_dir=str(tmp_path),
        peers=tuple(Peer(f"p{i}", f"127.0.0.1:{2 + i}", a) for i, a in enumerate(peers)),
        shard_map=str(path) if path else None,
    )


def test_a_node_finds_its_group_and_refuses_a_map_that_does_not_hold_it(tmp_path) -> None:
    shard_map = ShardMap.even(NODES)
    found, own = shard_of(_config(tmp_path, NODES[1][0], NODES[1][1:], shard_map))
    assert found == shard_map and own.index == 1
    with pytest.raises(ValueError, match="no group lists"):
        shard_of(_config(tmp_path, "127.0.0.1:1", NODES[1][1:], shard_map))
    with pytest.raises(ValueError, match="this node and its peers are"):
        shard_of(_config(tmp_path, NODES[1][0], [NODES[1][1], NODES[2][0]], shard_map))
    alone, own = shard_of(_config(tmp_path, NODES[0][0], NODES[0][1:], None))
    assert alone.groups == (Group(0, 0, HASH_SPACE, tuple(NODES[0])),) and own.index == 0


def _group_page(ids: list[str], after: str, size: int, scan_limit: int, state_of) -> tuple:
    """One group's List page, as the service pages: ids after `after` in byte order,
    at most `scan_limit` examined, a token when the page filled or the scan stopped."""
    later = [i for i in sorted(ids, key=str.encode) if i.encode() > after.encode()]
    page, last, examined = [], "", 0
    for saga_id in later[:scan_limit]:
        last, examined = saga_id, examined + 1
        if state_of(saga_id):
            page.append(sagas_pb2.SagaSummary(saga_id=saga_id))
        if len(page) >= size:
            break
    more = len(page) >= size or examined >= scan_limit
    return page, last if more else ""


@given(
    ids=st.sets(st.text("abcé0", min_size=1, max_size=3), min_size=5, max_size=60),
    groups=st.integers(1, 4),
    size=st.integers(1, 9),
    scan_limit=st.integers(1, 6),
    wanted=st.sets(st.sampled_from("abcé0"), max_size=3),
)
# Filtered pages that end at the scan limit before they fill: the merge may not
# run past the smallest group's token.
@example(ids={a + b for a in "abc0" for b in "abc0"}, groups=2, size=5, scan_limit=2, wanted={"a"})
def test_merged_pages_list_every_saga_once_in_order(ids, groups, size, scan_limit, wanted) -> None:
    def kept(saga_id: str) -> bool:  # a state filter: keeps ids starting with a wanted letter
        return not wanted or saga_id[0] in wanted

    shard_map = ShardMap.even([[f"10.0.0.{g}:1"] for g in range(groups)])
    held = [[i for i in ids if shard_map.group_of(i).index == g] for g in range(groups)]
    seen: list[str] = []
    token = ""
    for _ in range(len(ids) + 2):
        pages = [_group_page(h, token, size, scan_limit, kept) for h in held]
        sagas, token = merge_pages(pages, size)
        assert len(sagas) <= size
        seen += [s.saga_id for s in sagas]
        if not token:
            break
    assert not token, "paging did not end"
    assert seen == sorted((i for i in ids if kept(i)), key=str.encode)


def test_a_client_routes_once_it_knows_the_map() -> None:
    shard_map = ShardMap.even(NODES)
    routes = Routes(NODES[0][:1])
    assert routes.should_ask()
    assert routes.nodes_for("trip-1") == (NODES[0][0],)  # before the map: the given node
    routes.learned(None)  # no node answered: ask again only later
    assert not routes.should_ask()
    routes.learned(shard_map.to_reply(shard_map.groups[0]))
    assert not routes.should_ask()
    for k in range(20):
        saga_id = f"trip-{k}"
        assert routes.nodes_for(saga_id) == shard_map.group_of(saga_id).nodes
    assert routes.nodes_for(None) == (NODES[0][0],)  # List: any node merges the groups
