"""The JSON log lines, the level switch and the collapsing of repeated lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from libshared import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    touched = ("vslice.decisions", "vslice.test")
    levels = {name: logging.getLogger(name).level for name in touched}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def record(
    msg: str, *, created: float, level: int = logging.INFO, **extra: object
) -> logging.LogRecord:
    rec = logging.makeLogRecord(
        {"name": "vslice.test", "levelno": level, "levelname": logging.getLevelName(level)}
    )
    rec.msg, rec.created = msg, created
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


class Sink:
    """What a Collapse filter lets through or sends, in order."""

    def __init__(self, window_s: float = 10.0, max_keys: int = 1024) -> None:
        self.lines: list[logging.LogRecord] = []
        self.collapse = logs.Collapse(window_s=window_s, send=self.lines.append, max_keys=max_keys)

    def log(self, rec: logging.LogRecord) -> None:
        if self.collapse.filter(rec):
            self.lines.append(rec)


def test_a_line_is_one_json_object_with_the_fields_the_services_share() -> None:
    formatter = logs.JsonFormatter("scheduler")
    rec = record("placed", created=1700000000.12345, pod="ns/p", devices=["GPU-1"], latency_ms=1.5)
    line = json.loads(formatter.format(rec))
    assert line == {
        "ts": 1700000000.123,
        "level": "info",
        "logger": "vslice.test",
        "msg": "placed",
        "service": "scheduler",
        "pod": "ns/p",
        "devices": ["GPU-1"],
        "latency_ms": 1.5,
    }


def test_a_logged_exception_travels_as_its_traceback_in_exc(restore_logging: None) -> None:
    stream = io.StringIO()
    handler = logs.setup("admission", level="info")
    handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        raise RuntimeError("no route")
    except RuntimeError:
        logging.getLogger("vslice.test").exception("cannot serve")
    line = json.loads(stream.getvalue())
    assert line["level"] == "error"
    assert "RuntimeError: no route" in line["exc"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("info", (logging.INFO, {})),
        ("WARNING", (logging.WARNING, {})),
        (" debug ", (logging.DEBUG, {})),
        ("info,vslice.decisions=warning", (logging.INFO, {"vslice.decisions": logging.WARNING})),
        ("error, vslice.bus = debug", (logging.ERROR, {"vslice.bus": logging.DEBUG})),
    ],
)
def test_levels_read_a_root_level_and_levels_per_logger(
    text: str, expected: tuple[int, dict[str, int]]
) -> None:
    assert logs.parse_levels(text) == expected


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("loud", "'loud'"),
        ("", "must start with"),
        ("vslice.decisions=info", "must start with"),
        ("info,vslice.decisions", "'vslice.decisions' is not LOGGER=LEVEL"),
        ("info,vslice.decisions=chatty", "'chatty'"),
    ],
)
def test_a_bad_level_is_refused_naming_the_value(text: str, named: str) -> None:
    with pytest.raises(ValueError, match="log level") as caught:
        logs.parse_levels(text)
    assert named in str(caught.value)


def test_the_level_switch_turns_one_logger_down_and_keeps_the_others(
    restore_logging: None,
) -> None:
    stream = io.StringIO()
    handler = logs.setup("scheduler", level="info,vslice.decisions=warning")
    handler.setStream(stream)  # type: ignore[attr-defined]
    logging.getLogger("vslice.decisions").info("decision", extra={"pod": "ns/a"})
    logging.getLogger("vslice.test").info("replica ready")
    logging.getLogger("vslice.test").debug("detail")
    logging.getLogger("vslice.decisions").warning("conflict")
    lines = [json.loads(x)["msg"] for x in stream.getvalue().splitlines()]
    assert lines == ["replica ready", "conflict"]


def test_identical_lines_within_the_window_are_written_once_then_counted() -> None:
    sink = Sink(window_s=10.0)
    for i in range(5):
        sink.log(record("view behind the ledger", created=100.0 + i, node="n1"))
    assert [getattr(r, "repeated", None) for r in sink.lines] == [None]
    sink.log(record("replica ready", created=111.0))  # after the window: the count is out
    assert [(r.getMessage(), getattr(r, "repeated", None)) for r in sink.lines] == [
        ("view behind the ledger", None),
        ("view behind the ledger", 4),
        ("replica ready", None),
    ]
    assert sink.lines[1].window_s == 4.0  # type: ignore[attr-defined]
    assert sink.lines[1].node == "n1"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "other",
    [
        record("view behind the ledger", created=101.0, node="n2"),
        record("view behind the ledger", created=101.0, node="n1", level=logging.ERROR),
        record("view is behind", created=101.0, node="n1"),
    ],
    ids=["another field value", "another level", "another message"],
)
def test_lines_that_differ_in_a_field_level_or_message_are_not_collapsed(
    other: logging.LogRecord,
) -> None:
    sink = Sink()
    sink.log(record("view behind the ledger", created=100.0, node="n1"))
    sink.log(other)
    assert len(sink.lines) == 2


def test_a_line_after_its_window_passes_and_opens_a_new_window() -> None:
    sink = Sink(window_s=1.0)
    sink.log(record("retrying", created=100.0))
    sink.log(record("retrying", created=100.5))
    sink.log(record("retrying", created=101.2))
    sink.log(record("retrying", created=101.4))
    sink.collapse.flush()
    assert [getattr(r, "repeated", None) for r in sink.lines] == [None, 1, None, 1]


def test_flush_writes_the_counts_of_windows_that_ended_and_only_those() -> None:
    sink = Sink(window_s=5.0)
    sink.log(record("a", created=100.0))
    sink.log(record("a", created=101.0))
    sink.log(record("b", created=103.0))
    sink.log(record("b", created=104.0))
    sink.collapse.flush(now=106.0)
    assert [(r.getMessage(), getattr(r, "repeated", None)) for r in sink.lines] == [
        ("a", None),
        ("b", None),
        ("a", 1),
    ]


def test_a_line_never_repeated_leaves_no_count_line() -> None:
    sink = Sink(window_s=1.0)
    sink.log(record("a", created=100.0))
    sink.collapse.flush()
    assert len(sink.lines) == 1


def test_past_max_keys_the_oldest_kind_is_counted_out_first() -> None:
    sink = Sink(window_s=60.0, max_keys=2)
    sink.log(record("a", created=100.0))
    sink.log(record("a", created=100.1))
    sink.log(record("b", created=100.2))
    sink.log(record("c", created=100.3))  # forgets "a", writing its count
    assert [(r.getMessage(), getattr(r, "repeated", None)) for r in sink.lines] == [
        ("a", None),
        ("b", None),
        ("a", 1),
        ("c", None),
    ]


def test_the_handler_of_setup_collapses_and_writes_the_count_at_close(
    restore_logging: None,
) -> None:
    stream = io.StringIO()
    handler = logs.setup("nodeagent", level="info", window_s=60.0)
    handler.setStream(stream)  # type: ignore[attr-defined]
    for _ in range(50):
        logging.getLogger("vslice.test").warning("usage report late", extra={"node": "n1"})
    handler.close()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [x.get("repeated") for x in lines] == [None, 49]
    assert all(x["msg"] == "usage report late" and x["node"] == "n1" for x in lines)


@pytest.mark.parametrize(("window_s", "max_keys"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_a_collapse_filter_with_a_bad_window_or_size_is_refused(
    window_s: float, max_keys: int
) -> None:
    with pytest.raises(ValueError, match="must be"):
        logs.Collapse(window_s=window_s, max_keys=max_keys)


def test_asyncios_tls_eof_warning_is_dropped_and_its_other_warnings_are_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logs.quiet_tls_eof()
    logs.quiet_tls_eof()
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        logging.getLogger("asyncio").warning(
            "returning true from eof_received() has no effect when using ssl"
        )
        logging.getLogger("asyncio").warning("Executing %s took %.3f seconds", "task", 0.2)
    assert [r.getMessage() for r in caplog.records] == ["Executing task took 0.200 seconds"]
