"""docs/schema and docs/protocol.md, held to the wire models: the committed schemas are
what the models generate now, and every example frame of the protocol validates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from dispatcher import schemas
from dispatcher.messages import DecodeError, decode_node_message, decode_server_message

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.md"


def example_frames() -> list[dict[str, Any]]:
    """Every JSON object in the ```json blocks of docs/protocol.md (a block may hold several)."""
    decoder = json.JSONDecoder()
    frames = []
    for block in re.findall(r"```json\n(.*?)```", PROTOCOL.read_text(), re.S):
        at = 0
        while block[at:].strip():
            at += len(block[at:]) - len(block[at:].lstrip())
            frame, at = decoder.raw_decode(block, at)
            frames.append(frame)
    return frames


def test_the_committed_schemas_are_what_the_models_generate() -> None:
    assert schemas.stale_files(schemas.DEFAULT_FOLDER) == [], "run: .venv/bin/python -m dispatcher.schemas"


def test_the_check_command_sees_a_stale_folder(tmp_path: Path) -> None:
    schemas.write(tmp_path)
    assert schemas.main([str(tmp_path), "--check"]) == 0
    (tmp_path / "job_ack.json").write_text("{}\n")
    (tmp_path / "gone.json").write_text("{}\n")
    assert schemas.stale_files(tmp_path) == ["gone.json", "job_ack.json"]
    assert schemas.main([str(tmp_path), "--check"]) == 1


def test_every_schema_is_a_valid_schema() -> None:
    for name, schema in schemas.all_schemas().items():
        if name != "index.json":
            Draft202012Validator.check_schema(schema)


def test_the_protocol_shows_every_frame_type() -> None:
    shown = {frame.get("type") for frame in example_frames()}
    assert shown == {*schemas.NODE_TO_SERVER, *schemas.SERVER_TO_NODE}


@pytest.mark.parametrize("frame", example_frames(), ids=lambda f: str(f.get("type")))
def test_each_example_frame_validates_against_its_schema_and_model(frame: dict[str, Any]) -> None:
    schema = json.loads((schemas.DEFAULT_FOLDER / f"{frame['type']}.json").read_text())
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in Draft202012Validator(schema).iter_errors(frame)]
    assert errors == []
    decode = decode_node_message if frame["type"] in schemas.NODE_TO_SERVER else decode_server_message
    assert decode(json.dumps(frame)).type == frame["type"]


@pytest.mark.parametrize("frame", [
    {"type": "node_register", "labels": {"bad key": "x"}},
    {"type": "node_register", "max_concurrent_jobs": 0},
    {"type": "node_heartbeat", "node_id": "n 1"},
    {"type": "node_heartbeat", "resource_usage": {"cpu_percent": 101}},
    {"type": "job_result", "job_id": "j", "attempt": 1},
])
def test_what_the_server_refuses_the_schema_refuses(frame: dict[str, Any]) -> None:
    schema = json.loads((schemas.DEFAULT_FOLDER / f"{frame['type']}.json").read_text())
    assert not Draft202012Validator(schema).is_valid(frame)
    with pytest.raises(DecodeError):
        decode_node_message(json.dumps(frame))
