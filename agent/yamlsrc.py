"""YAML with positions: the shared front end of meshlet's file loaders.

Rules every loader built on this module follows:

- Bad input raises :class:`SourceError` and nothing else.  Each problem names
  the file, the 1-based line and column, the field path (``pods[3].ips[0]``)
  and what is wrong, one line per problem::

      inventory.yaml:12:7: pods[3].ips[0]: '10.244.1.300' is not an IP address

- Fail closed: unknown fields, duplicate keys, YAML tags we do not understand,
  merge keys and multi-document files are errors, never silently ignored.
- Report everything at once: readers record a problem and carry on, so one run
  shows all the mistakes in a file (the message lists the first
  :data:`MAX_SHOWN`; ``.errors`` keeps them all).

How it works: :func:`parse` composes the text into a node tree (every node
keeps its start mark) without constructing Python objects: libyaml's C parser
makes the events (PyYAML's pure-Python scanner is ~15x slower), a small
composer of ours builds the nodes and bounds what a hostile file can cost
(:data:`MAX_TEXT_BYTES`, :data:`MAX_DEPTH`, :data:`MAX_ALIAS_NODES`: a
"billion laughs" alias bomb or 50,000 nested brackets is refused at its line
instead of exhausting memory or the C stack), and the cyclic garbage
collector is paused while it runs (with it, composing a 10,000-rule file
took 7 s instead of 0.6 s: the collector rescans the growing tree); loaders
then walk that tree through :class:`Value` and
:class:`MapReader`, converting each scalar with a small *converter* function
(``string``, ``integer(1, 64)``, ``ip_address(4)``, ``list_of(port)``...).
A converter takes a :class:`Value` and returns the Python value or raises
:class:`Invalid` with a message; the reader turns that into a
:class:`Problem` at the value's position.

Size: ~850 lines: the bounded composer, the tree walker and every converter the file
formats share; each loader (config, inventory, policies) is built on it, so its rules live once.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

# libyaml's C parser: PyYAML's wheels and Debian's python3-yaml both have it
# (the pure-Python scanner is ~15x slower on large policy sets).
from yaml._yaml import CParser as _EventParser
from yaml.composer import ComposerError
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from agent.gcutil import gc_paused

_CSafeLoader = yaml.CSafeLoader
_CSafeDumper = yaml.CSafeDumper

__all__ = [
    "MAX_SHOWN",
    "Problem",
    "SourceError",
    "Invalid",
    "Reported",
    "Document",
    "Value",
    "MapReader",
    "parse",
    "read_text",
    "did_you_mean",
    "string",
    "any_string",
    "boolean",
    "integer",
    "number",
    "port",
    "enum",
    "ip_address",
    "ip_network",
    "dns_label",
    "dns_subdomain",
    "absolute_path",
    "list_of",
    "map_of",
    "entries",
    "position",
    "IPAddress",
    "IPNetwork",
    "compose_all",
    "gc_paused",
    "load_plain_all",
    "dump_plain",
    "MAX_TEXT_BYTES",
    "MAX_DEPTH",
    "MAX_ALIAS_NODES",
]

T = TypeVar("T")
Converter = Callable[["Value"], T]

#: How many problems ``str(SourceError)`` lists before summarising the rest.
MAX_SHOWN = 20

#: Largest text a loader accepts (10,000 policy rules take about 1.4 MB).
MAX_TEXT_BYTES = 32 * 1024 * 1024
#: Deepest nesting of lists and mappings (meshlet's formats need fewer than 15).
MAX_DEPTH = 64
#: How many nodes aliases (``*name``) may add in all, counting what an alias
#: of an alias expands to.  Anchors that share a list of principals across a
#: few dozen rules stay far below; an alias bomb meets it at its first lines.
MAX_ALIAS_NODES = 10_000

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Scalar tags SafeLoader resolves implicitly or by !!short form and that we
# accept; anything else (custom "!foo", !!python/...) is refused.
_SCALAR_TAGS = {
    _STR_TAG,
    _NULL_TAG,
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:binary",
}


# --------------------------------------------------------------------------
# Problems and the error


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file, at a 1-based line/column (0 = unknown)."""

    file: str
    line: int
    column: int
    path: str
    """Field path such as ``proxy.redirectIPv4`` or ``pods[3].ips[0]``; "" for the whole file."""
    message: str

    def as_dict(self) -> dict[str, Any]:
        """The problem as JSON-ready data (admin API and ``-o json`` answers)."""
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
            "text": str(self),
        }

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}:{self.column}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class SourceError(ValueError):
    """A file could not be loaded; ``.errors`` lists every problem found."""

    def __init__(self, errors: Iterable[Problem]):
        self.errors: list[Problem] = list(errors)
        if not self.errors:
            raise ValueError("SourceError needs at least one problem")
        lines = [str(p) for p in self.errors[:MAX_SHOWN]]
        hidden = len(self.errors) - MAX_SHOWN
        if hidden > 0:
            lines.append(f"... and {hidden} more problem{'s' if hidden > 1 else ''}")
        super().__init__("\n".join(lines))


class Invalid(Exception):
    """Raised by a converter: the value is wrong, the message says why."""


class Reported(Invalid):
    """Raised by a converter whose problems were already recorded (nested values)."""

    def __init__(self) -> None:
        super().__init__("already reported")


# --------------------------------------------------------------------------
# The document: file name, problem list, scalar construction


class Document:
    """One parsed file: its name, its root node and the problems found so far."""

    def __init__(self, filename: str, root: Node | None = None):
        self.filename = filename
        self.root = root
        self.problems: list[Problem] = []
        self._ctor = yaml.SafeLoader("")  # only its scalar constructors are used

    # -- recording
    def add(self, line: int, column: int, path: str, message: str) -> None:
        self.problems.append(Problem(self.filename, line, column, path, message))

    def add_at(self, node: Node | None, path: str, message: str) -> None:
        line, column = position(node)
        self.add(line, column, path, message)

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def check(self) -> None:
        """Raise :class:`SourceError` (problems sorted by position) if any were recorded."""
        if self.problems:
            raise SourceError(sorted(self.problems, key=lambda p: (p.line, p.column)))

    def top(self) -> MapReader:
        """The top-level mapping (``parse`` has already checked it is one)."""
        assert self.root is not None
        return MapReader(Value(self, self.root, ""))

    def construct(self, node: ScalarNode) -> Any:
        if node.tag == _STR_TAG:
            return node.value  # what SafeLoader's str constructor returns, without its bookkeeping
        if node.tag not in _SCALAR_TAGS:
            raise Invalid(f"unsupported YAML tag {node.tag!r}")
        try:
            return self._ctor.construct_object(node, deep=True)
        except Exception as e:  # noqa: BLE001 - e.g. "!!int abc", "!!timestamp x"
            detail = getattr(e, "problem", None) or str(e) or type(e).__name__
            raise Invalid(f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}: {detail}") from None


def position(node: Node | None) -> tuple[int, int]:
    """1-based (line, column) of a node's start; (0, 0) when unknown."""
    mark = getattr(node, "start_mark", None)
    if mark is None:
        return (0, 0)
    return (mark.line + 1, mark.column + 1)


def read_text(path: str) -> str:
    """Read a config file as UTF-8; failures become a :class:`SourceError`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SourceError([Problem(str(path), 0, 0, "", f"cannot read file: {e.strerror or e}")]) from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SourceError([Problem(str(path), line, col, "", "file is not valid UTF-8")]) from e


# --------------------------------------------------------------------------
# Composing: libyaml events, our bounded composer


class LimitExceeded(yaml.MarkedYAMLError):
    """The text is valid YAML but exceeds one of the composer's bounds."""

    def __init__(self, message: str, mark: Any) -> None:  # libyaml's Mark or PyYAML's
        super().__init__(None, None, message, mark)


_RESOLVER = Resolver()  # the standard implicit tags; no path resolvers


def _compose(parser: Any, starts: list[tuple[int, int]]) -> list[Node]:
    """Every document's node tree from libyaml's events, with three bounds:
    nesting depth, the nodes aliases add (counting what an alias of an
    alias expands to), and (checked by the caller) the text's size.
    ``starts`` gets the 1-based (line, column) of each document.

    The nodes, tags, marks and errors are those of PyYAML's composer
    (duplicate and undefined anchors included), built in one loop over the
    events rather than its recursive methods: composing a 10,000-rule policy
    file took 0.67 s of CPU that way and 0.50 s this way (0.20 s of it is
    libyaml making the events), and there is no recursion to bound."""
    get_event = parser.get_event
    resolve = _RESOLVER.resolve
    roots: list[Node] = []
    anchors: dict[str, Node] = {}
    sizes: dict[str, int] = {}  # anchor -> expanded size of its node
    stack: list[list[Any]] = []  # open collections: [node, nodes before it, anchor, pending key]
    nodes = alias_nodes = 0
    get_event()  # StreamStartEvent
    while True:
        event = get_event()
        kind = type(event)
        if kind is ScalarEvent:
            anchor = event.anchor
            if anchor is not None and anchor in anchors:
                raise _duplicate(anchor, anchors[anchor], event)
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolve(ScalarNode, event.value, event.implicit)
            node: Node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
            nodes += 1
            if anchor is not None:
                anchors[anchor] = node
                sizes[anchor] = 1
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            if len(stack) >= MAX_DEPTH:
                raise LimitExceeded(
                    f"lists and mappings are nested more than {MAX_DEPTH} deep", event.start_mark
                )
            anchor = event.anchor
            if anchor is not None and anchor in anchors:
                raise _duplicate(anchor, anchors[anchor], event)
            tag = event.tag
            mapping = kind is MappingStartEvent
            if tag is None or tag == "!":
                tag = resolve(MappingNode if mapping else SequenceNode, None, event.implicit)
            cls = MappingNode if mapping else SequenceNode
            coll = cls(tag, [], event.start_mark, None, flow_style=event.flow_style)
            if anchor is not None:
                anchors[anchor] = coll
            stack.append([coll, nodes, anchor, _NO_KEY])
            nodes += 1
            continue
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            node, before, anchor, _ = stack.pop()
            node.end_mark = event.end_mark
            if anchor is not None:
                sizes[anchor] = nodes - before
        elif kind is AliasEvent:
            anchor = event.anchor
            size = sizes.get(anchor or "", 1)
            nodes += size
            alias_nodes += size
            if alias_nodes > MAX_ALIAS_NODES:
                raise LimitExceeded(
                    f"alias '*{anchor}' takes what aliases expand to past "
                    f"{MAX_ALIAS_NODES} nodes (an alias bomb?); write the values out "
                    "or use fewer aliases",
                    event.start_mark,
                )
            if anchor not in anchors:
                raise ComposerError(None, None, f"found undefined alias {anchor!r}", event.start_mark)
            node = anchors[anchor]
        elif kind is DocumentStartEvent:
            starts.append((event.start_mark.line + 1, event.start_mark.column + 1))
            continue
        elif kind is DocumentEndEvent:
            anchors = {}
            continue
        else:  # StreamEndEvent
            return roots
        if not stack:
            roots.append(node)
            continue
        top = stack[-1]
        coll = top[0]
        if type(coll) is SequenceNode:
            coll.value.append(node)
        elif top[3] is _NO_KEY:
            top[3] = node
        else:
            coll.value.append((top[3], node))
            top[3] = _NO_KEY


_NO_KEY = object()


def _duplicate(anchor: str, first: Node, event: Any) -> ComposerError:
    return ComposerError(
        f"found duplicate anchor {anchor!r}; first occurrence",
        first.start_mark,
        "second occurrence",
        event.start_mark,
    )


def compose_all(text: str, filename: str) -> list[tuple[tuple[int, int], Node]]:
    """Every document of ``text`` as (where it starts, its node tree),
    within the bounds above.

    Raises :class:`SourceError` naming ``filename`` and the line for syntax
    errors, a text over :data:`MAX_TEXT_BYTES`, nesting over
    :data:`MAX_DEPTH` and aliases expanding past :data:`MAX_ALIAS_NODES`.
    Callers that walk the tree afterwards should do so under
    :func:`gc_paused` too."""

    def fail(line: int, column: int, message: str) -> SourceError:
        return SourceError([Problem(filename, line, column, "", message)])

    if len(text) > MAX_TEXT_BYTES:
        raise fail(
            1,
            1,
            f"file is {len(text) / 1e6:.1f} MB; meshlet reads at most "
            f"{MAX_TEXT_BYTES // (1024 * 1024)} MB per file (split it)",
        )
    starts: list[tuple[int, int]] = []
    parser = None
    try:
        with gc_paused():
            parser = _EventParser(text)  # checks for unprintable characters right here
            roots = _compose(parser, starts)
    except (yaml.YAMLError, RecursionError) as e:
        raise syntax_error(e, text, fail) from None
    finally:
        if parser is not None:
            parser.dispose()
    return list(zip(starts, roots, strict=True))


def load_plain_all(text: str) -> list[Any]:
    """Plain Python data of every document of ``text`` (None for empty ones),
    with libyaml.  Only for text that :func:`compose_all` already accepted
    (its bounds protect libyaml's recursive composer); no positions."""
    with gc_paused():
        return list(yaml.load_all(text, Loader=_CSafeLoader))


def dump_plain(doc: Any) -> str:
    """Block-style YAML of plain data, keys in their given order (libyaml)."""
    return yaml.dump(doc, Dumper=_CSafeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def syntax_error(e: BaseException, text: str, fail) -> SourceError:
    """Turn a PyYAML (or recursion) error while reading ``text`` into the
    positioned error ``fail(line, column, message)`` builds.  Shared by every
    loader that reads YAML itself (single- and multi-document)."""
    if isinstance(e, LimitExceeded):
        mark = e.problem_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        return fail(line, column, str(e.problem))
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        what = e.problem or e.context or "cannot parse"
        if e.context and e.problem:
            what = f"{e.problem} ({e.context})"
        return fail(line, column, f"YAML syntax error: {what}")
    if isinstance(e, yaml.reader.ReaderError):
        offset = e.position
        # libyaml counts bytes of the UTF-8 encoding, not characters
        offset = len(text.encode("utf-8")[:offset].decode("utf-8", "ignore"))
        line = text.count("\n", 0, offset) + 1
        column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        return fail(line, column, f"YAML syntax error: character {e.character:#x} is not allowed")
    if isinstance(e, RecursionError):
        return fail(0, 0, "YAML is nested too deeply")
    return fail(0, 0, f"YAML syntax error: {e}")


def parse(text: str, filename: str) -> Document:
    """Compose ``text`` into a :class:`Document` whose root is a mapping.

    Raises :class:`SourceError` for YAML syntax errors (with YAML's own
    position), an empty file, several documents, or a non-mapping top level.
    """

    def fail(line: int, column: int, message: str) -> SourceError:
        return SourceError([Problem(filename, line, column, "", message)])

    docs = compose_all(text, filename)
    if len(docs) > 1:
        line, column = docs[1][0]
        raise fail(
            line,
            column,
            "a second YAML document starts here; put everything in one document (remove the '---')",
        )
    root = docs[0][1] if docs else None
    if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL_TAG):
        raise fail(1, 1, "file is empty; expected a mapping of fields")
    if not isinstance(root, MappingNode):
        line, column = position(root)
        raise fail(line, column, f"top level must be a mapping of fields, got {describe_node(root)}")
    return Document(filename, root)


# --------------------------------------------------------------------------
# Walking the tree


def describe_node(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    tag = node.tag.rsplit(":", 1)[-1]
    return {
        "str": "a string",
        "null": "null",
        "int": "an integer",
        "float": "a number",
        "bool": "a boolean",
        "timestamp": "a date",
        "binary": "binary data",
    }.get(tag, f"a {tag!r} value")


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _key_path(parent: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{key!r}]"


class Value:
    """A node of the tree together with its field path."""

    __slots__ = ("doc", "node", "path")

    def __init__(self, doc: Document, node: Node, path: str):
        self.doc = doc
        self.node = node
        self.path = path

    @property
    def line(self) -> int:
        return position(self.node)[0]

    @property
    def column(self) -> int:
        return position(self.node)[1]

    @property
    def where(self) -> str:
        """``line N`` for messages that point back at this value."""
        return f"line {self.line}"

    def problem(self, message: str) -> None:
        self.doc.add_at(self.node, self.path, message)

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, ScalarNode) and self.node.tag == _NULL_TAG

    def scalar(self) -> Any:
        """The constructed Python value of a scalar node."""
        if not isinstance(self.node, ScalarNode):
            raise Invalid(f"expected a single value, got {describe_node(self.node)}")
        return self.doc.construct(self.node)

    def items(self) -> list[Value]:
        """Elements of a list, each with its ``[i]`` path."""
        if not isinstance(self.node, SequenceNode):
            raise Invalid(f"expected a list, got {describe_node(self.node)}")
        if self.node.tag != _SEQ_TAG:
            raise Invalid(f"unsupported YAML tag {self.node.tag!r}")
        return [Value(self.doc, n, f"{self.path}[{i}]") for i, n in enumerate(self.node.value)]

    def mapping(self) -> MapReader:
        if not isinstance(self.node, MappingNode):
            raise Invalid(f"expected a mapping, got {describe_node(self.node)}")
        if self.node.tag != _MAP_TAG:
            raise Invalid(f"unsupported YAML tag {self.node.tag!r}")
        return MapReader(self)

    def convert(self, conv: Converter[T]) -> T | None:
        """Run a converter; on failure record the problem and return None."""
        try:
            return conv(self)
        except Reported:
            return None
        except Invalid as e:
            self.problem(str(e))
            return None


_MISSING: Any = object()


class MapReader:
    """Typed access to the fields of one YAML mapping.

    Call :meth:`get` / :meth:`section` for every field the mapping may hold,
    then :meth:`finish`, which reports the fields nobody asked for.  Problems
    go to the document; failed fields read as ``None``.
    """

    def __init__(self, value: Value):
        self.value = value
        self.doc = value.doc
        self.path = value.path
        self.entries: dict[str, tuple[Value, Value]] = {}  # key -> (key, value)
        self._asked: list[str] = []
        node = value.node
        assert isinstance(node, MappingNode)
        for knode, vnode in node.value:
            if knode.tag == _MERGE_TAG:
                self.doc.add_at(knode, self.path, "merge keys ('<<') are not supported; write the fields out")
                continue
            if not isinstance(knode, ScalarNode) or knode.tag != _STR_TAG:
                shown = knode.value if isinstance(knode, ScalarNode) else "..."
                self.doc.add_at(
                    knode,
                    self.path,
                    f"field names must be strings, got {describe_node(knode)} {shown!r} (quote it)",
                )
                continue
            key = knode.value
            kpath = _key_path(self.path, key)
            if key in self.entries:
                first = self.entries[key][0]
                self.doc.add_at(knode, kpath, f"duplicate key {key!r} (first given at {first.where})")
                continue
            self.entries[key] = (Value(self.doc, knode, kpath), Value(self.doc, vnode, kpath))

    # -- access
    def has(self, key: str) -> bool:
        """The field is present and not null."""
        e = self.entries.get(key)
        return e is not None and not e[1].is_null

    def at(self, key: str) -> Value | None:
        """The raw value of a present, non-null field (for positions in cross-checks)."""
        self._ask(key)
        return self.entries[key][1] if self.has(key) else None

    def key_at(self, key: str) -> Value | None:
        e = self.entries.get(key)
        return e[0] if e else None

    def get(self, key: str, conv: Converter[T], default: Any = _MISSING) -> Any:
        """Read field ``key`` with ``conv``; required unless ``default`` is given.

        A null value counts as absent.  Returns ``None`` after recording a
        problem when the field is missing or invalid.
        """
        self._ask(key)
        if not self.has(key):
            if default is _MISSING:
                line, column = position(self.value.node)
                self.doc.add(line, column, _key_path(self.path, key), "required field is missing")
                return None
            return default
        return self.entries[key][1].convert(conv)

    def section(self, key: str) -> MapReader | None:
        """An optional nested mapping; absent or null gives an empty one."""
        self._ask(key)
        if not self.has(key):
            empty = MappingNode(_MAP_TAG, [], self.value.node.start_mark, self.value.node.end_mark)
            return MapReader(Value(self.doc, empty, _key_path(self.path, key)))
        return self.entries[key][1].convert(Value.mapping)

    def finish(self) -> None:
        """Report every field that no ``get``/``section``/``at`` asked for."""
        allowed = list(dict.fromkeys(self._asked))
        for key, (kv, _) in self.entries.items():
            if key not in allowed:
                hint = did_you_mean(key, allowed)
                kv.problem(
                    f"unknown field {key!r}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                    + ("" if hint else f"; known fields: {', '.join(allowed)}")
                )

    def _ask(self, key: str) -> None:
        self._asked.append(key)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word`` (case/underscore-insensitive first), if close."""
    choices = list(choices)

    def norm(s: str) -> str:
        return re.sub(r"[-_ ]", "", s.lower())

    for c in choices:
        if norm(c) == norm(word):
            return c
    import difflib  # here: an error path; every process that reads a file would hold it

    normed = {norm(c): c for c in choices}
    close = difflib.get_close_matches(norm(word), list(normed), n=1, cutoff=0.6)
    return normed[close[0]] if close else None


# --------------------------------------------------------------------------
# Converters


def _typed(v: Value, want: type | tuple[type, ...], what: str) -> Any:
    x = v.scalar()
    wanted = want if isinstance(want, tuple) else (want,)
    if isinstance(x, bool) and bool not in wanted:
        raise Invalid(
            f"expected {what}, got a boolean ({v.node.value!r}"
            + ("; quote it if you meant a string)" if str in wanted else ")")
        )
    if x is None:
        raise Invalid(f"expected {what}, got nothing (null)")
    if not isinstance(x, want):
        hint = " (quote it)" if str in wanted else ""
        raise Invalid(f"expected {what}, got {describe_node(v.node)} {v.node.value!r}{hint}")
    return x


def any_string(v: Value) -> str:
    """A string, possibly empty."""
    return _typed(v, str, "a string")


def string(v: Value) -> str:
    """A non-empty string without NUL characters."""
    s = any_string(v)
    if not s:
        raise Invalid("must not be empty")
    if "\0" in s:
        raise Invalid("must not contain NUL characters")
    return s


def boolean(v: Value) -> bool:
    return _typed(v, bool, "true or false")


def integer(lo: int | None = None, hi: int | None = None, *, hex_string: bool = False) -> Converter[int]:
    """An integer in ``[lo, hi]``; with ``hex_string`` also a quoted "0x..." string."""

    def conv(v: Value) -> int:
        x = _typed(v, (int, str) if hex_string else int, "an integer")
        if isinstance(x, str):
            if not re.fullmatch(r"0[xX][0-9a-fA-F_]+|[0-9_]+", x.strip()):
                raise Invalid(f"{x!r} is not an integer (decimal or 0x hex)")
            x = int(x.strip().replace("_", ""), 0 if x.strip()[:2].lower() == "0x" else 10)
        _check_range(x, lo, hi)
        return x

    return conv


def _check_range(x: float, lo: float | None, hi: float | None, lo_open: bool = False) -> None:
    if lo_open and lo is not None and not x > lo:
        raise Invalid(f"{x} must be greater than {lo}" + (f" and at most {hi}" if hi is not None else ""))
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        if lo is not None and hi is not None:
            raise Invalid(f"{x} is out of range ({lo}..{hi})")
        raise Invalid(f"{x} must be at least {lo}" if lo is not None else f"{x} must be at most {hi}")


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Converter[float]:
    """A finite number (int or float) in range; ``lo_open`` excludes ``lo`` itself."""

    def conv(v: Value) -> float:
        x = _typed(v, (int, float), "a number")
        if not math.isfinite(x):
            raise Invalid(f"{v.node.value!r} is not a finite number")
        _check_range(x, lo, hi, lo_open)
        return float(x)

    return conv


def port(v: Value) -> int:
    """A TCP port, 1..65535."""
    x = _typed(v, int, "a port number")
    if not 1 <= x <= 65535:
        raise Invalid(f"{x} is not a port number (1..65535)")
    return x


def enum(*choices: str) -> Converter[str]:
    """One of ``choices`` (exact spelling)."""

    def conv(v: Value) -> str:
        x = _typed(v, str, "one of: " + ", ".join(choices))
        if x not in choices:
            hint = did_you_mean(x, choices)
            raise Invalid(
                f"{x!r} is not one of: {', '.join(choices)}" + (f" (did you mean {hint!r}?)" if hint else "")
            )
        return x

    return conv


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_address(version: int | None = None) -> Converter[IPAddress]:
    """A unicast IP address (of the given version, if any), as an ``ipaddress`` object.

    Unspecified (0.0.0.0, ::), multicast and IPv4-mapped IPv6 addresses are
    refused: none of them can name a pod, node or proxy.
    """
    label = {None: "an IP address", 4: "an IPv4 address", 6: "an IPv6 address"}[version]

    def conv(v: Value) -> IPAddress:
        x = _typed(v, str, label)
        try:
            addr = ipaddress.ip_address(x)
        except ValueError:
            raise Invalid(f"{x!r} is not {label}") from None
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
            raise Invalid(f"{x!r}: zone indexes ('%...') are not allowed")
        if version is not None and addr.version != version:
            raise Invalid(f"{x!r} is not {label}")
        if addr.is_unspecified or addr.is_multicast:
            raise Invalid(
                f"{x!r} is {'unspecified' if addr.is_unspecified else 'multicast'}; "
                "a unicast address is needed here"
            )
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            raise Invalid(f"{x!r} is an IPv4-mapped IPv6 address; write {addr.ipv4_mapped} instead")
        return addr

    return conv


def ip_network(v: Value) -> IPNetwork:
    """A CIDR such as ``10.0.0.0/8`` or ``fd00::/8`` (host bits must be zero);
    a bare address means a single host (/32, /128)."""
    x = _typed(v, str, "a CIDR")
    try:
        return ipaddress.ip_network(x, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(x, strict=False)
        except ValueError:
            raise Invalid(f"{x!r} is not a CIDR (like 10.0.0.0/8 or fd00::/8)") from None
        raise Invalid(f"{x!r} has host bits set (did you mean '{loose}'?)") from e


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def dns_label(v: Value) -> str:
    """An RFC 1123 label: lower-case alphanumerics and '-', at most 63 characters."""
    x = _typed(v, str, "a name")
    if len(x) > 63:
        raise Invalid(f"{x[:20]!r}... is {len(x)} characters; names are at most 63")
    if not _DNS_LABEL.fullmatch(x):
        raise Invalid(
            f"{x!r} is not a valid name: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return x


def dns_subdomain(v: Value) -> str:
    """Dot-separated RFC 1123 labels, at most 253 characters."""
    x = _typed(v, str, "a name")
    if len(x) > 253 or not all(_DNS_LABEL.fullmatch(p) and len(p) <= 63 for p in x.split(".")):
        raise Invalid(
            f"{x!r} is not a valid name: use lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return x


def absolute_path(v: Value) -> str:
    """A non-empty absolute filesystem path."""
    x = string(v)
    if not x.startswith("/"):
        raise Invalid(f"{x!r} must be an absolute path (start with '/')")
    return x


def list_of(conv: Converter[T], *, min_len: int = 0) -> Converter[tuple[T, ...]]:
    """A list whose items all pass ``conv``; each bad item is reported at its own position."""

    def convert(v: Value) -> tuple[T, ...]:
        items = v.items()
        if len(items) < min_len:
            raise Invalid(f"needs at least {min_len} item{'s' if min_len > 1 else ''}")
        before = len(v.doc.problems)
        out = [item.convert(conv) for item in items]
        if len(v.doc.problems) != before:
            raise Reported()
        # items that failed were reported above (Reported raised): none is None here
        return tuple(out)  # type: ignore[arg-type]

    return convert


def map_of(key: Converter[str], value: Converter[T]) -> Converter[dict[str, T]]:
    """A mapping of string keys to values, each checked where it stands."""

    def convert(v: Value) -> dict[str, T]:
        before = len(v.doc.problems)
        reader = v.mapping()
        out: dict[str, Any] = {}
        for kv, vv in reader.entries.values():
            k = kv.convert(key)
            val = vv.convert(value)
            if k is not None:
                out[k] = val
        if len(v.doc.problems) != before:
            raise Reported()
        return out

    return convert


def entries(reader: MapReader) -> Iterator[tuple[Value, Value]]:
    """(key, value) pairs of a mapping, in file order."""
    return iter(reader.entries.values())
