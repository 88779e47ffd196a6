"""Each round's sampled pairs, saved under the run's location so that a restarted round does not resample.

    <output_dir>/<name>/iterate/round_<r>/pairs.jsonl    {prompt, chosen, rejected} rows: a `data.train` file
    <output_dir>/<name>/iterate/round_<r>/pairing.json   the round's counts, written last: its pairs are complete
    <output_dir>/<name>/iterate/round_<r>/<name>-round-<r>/   the round's training run (checkpoints, export)
    <output_dir>/<name>/iterate/round_<r>/done.json      the round's outcome, written after its training: a rerun
                                                         skips the round

Local paths or object storage alike (mdpo_ray.storage); each file is written whole or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict

from mdpo_ray import storage
from mdpo_ray.iterate.verify import Pairing

ROUNDS_DIR = "iterate"
PAIRS_FILE, PAIRING_FILE, DONE_FILE = "pairs.jsonl", "pairing.json", "done.json"


def round_location(run_location: str, round_index: int) -> str:
    """Where round `round_index` keeps its pairs: under the run's location (RunConfig.run_location)."""
    return storage.join(run_location, ROUNDS_DIR, f"round_{round_index:03d}")


def save_pairing(location: str, pairing: Pairing) -> None:
    """The pairs, then the counts: a round killed between the two has no counts file and is sampled again."""
    rows = "".join(json.dumps(pair) + "\n" for pair in pairing.pairs)
    storage.write_bytes(storage.join(location, PAIRS_FILE), rows.encode())
    counts = {key: value for key, value in asdict(pairing).items() if key != "pairs"}
    storage.write_bytes(storage.join(location, PAIRING_FILE), json.dumps(counts, indent=2).encode())


def load_pairing(location: str) -> Pairing | None:
    """A completely saved round's Pairing, or None if it was never saved or its save did not finish."""
    if not storage.is_file(storage.join(location, PAIRING_FILE)):
        return None
    counts = json.loads(storage.read_bytes(storage.join(location, PAIRING_FILE)))
    text = storage.read_bytes(storage.join(location, PAIRS_FILE)).decode()
    return Pairing(pairs=[json.loads(line) for line in text.splitlines() if line], **counts)


def sampled_once(location: str, sample: Callable[[], Pairing]) -> tuple[Pairing, bool]:
    """(the round's pairing, whether it was read back): a saved round is read, otherwise `sample()` runs and its
    result is saved before it is returned."""
    saved = load_pairing(location)
    if saved is not None:
        return saved, True
    pairing = sample()
    save_pairing(location, pairing)
    return pairing, False


def save_done(location: str, record: dict) -> None:
    """The round's outcome (its export, checkpoint and final metrics), written once its training finished."""
    storage.write_bytes(storage.join(location, DONE_FILE), json.dumps(record, indent=2).encode())


def load_done(location: str) -> dict | None:
    """A finished round's record, or None if the round has not finished."""
    path = storage.join(location, DONE_FILE)
    return json.loads(storage.read_bytes(path)) if storage.is_file(path) else None
