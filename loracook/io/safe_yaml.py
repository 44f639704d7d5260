"""YAML with bounds: recipes are parsed into data plus the line and column of every key, and no input can make
that cost more than a small, fixed amount of time and memory.

PyYAML alone lets a few hundred bytes do damage: an alias bomb (``a: &a [x, x]``, ``b: &b [*a, *a]``, ... nine
levels deep) is a billion values once expanded, and anything that walks it (our line-number walker, pydantic)
expands it; a recursive alias (``&a [*a]``) or a few hundred nested brackets exhaust the Python stack. The
composer here counts as it goes and refuses, with the line, before anything is expanded:

- more than :data:`MAX_ALIASES` aliases, or an alias to a node that contains it (recursion);
- nesting deeper than :data:`MAX_DEPTH`;
- a document whose expanded size (every alias counted as the copy it stands for) passes :data:`MAX_NODES`;
- a text longer than :data:`MAX_BYTES`.

The walker is iterative and handles YAML merge keys (``<<: *defaults`` followed by overrides, which are not
duplicates), while a key written twice in one mapping is still an error. Non-UTF-8 files get the line and
column of the first bad byte and how to convert them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loracook.errors import BadInput

Loc = tuple[str | int, ...]
Positions = dict[Loc, tuple[int, int]]

MAX_ALIASES = 100  # a recipe that shares a few settings uses a handful
MAX_DEPTH = 64  # the deepest recipe key is about 6 levels down
MAX_NODES = 20_000  # values after expanding aliases: per-layer lists for 20 sources x 100 layers are 2,000
MAX_BYTES = 1024 * 1024  # recipes are a few kB; pure-Python composing of a megabyte already takes seconds

_MERGE_TAG = "tag:yaml.org,2002:merge"


def parse_yaml(text: str, file: str | Path) -> tuple[Any, Positions]:
    """Parse one YAML document; returns the data and ``positions`` (recipe location -> (line, column)).

    Raises BadInput with the line and column for malformed YAML, for input past the bounds above, for
    duplicate keys and for keys that are not plain scalars."""
    file = Path(file)
    if len(text) > MAX_BYTES:
        raise BadInput(
            f"the recipe is {len(text):,} characters long; recipes are limited to {MAX_BYTES:,}",
            file=file,
            fix="is this the right file?",
        )
    _refuse_deep_flow(text, file)
    loader = None
    try:
        loader = _BoundedLoader(text, file)
        node = loader.get_single_node()
        positions = _positions(node, file) if node is not None else {}
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise _marked(exc, file) from None
    except yaml.reader.ReaderError as exc:
        raise _unreadable(exc, text, file) from None
    except yaml.YAMLError as exc:
        raise BadInput(f"malformed YAML: {' '.join(str(exc).split())}", file=file) from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        # What PyYAML's constructor lets through, e.g. an integer of more than 4300 digits
        raise BadInput(
            f"the YAML could not be read: {_first_line(exc)}", file=file, fix="check the values"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, positions


def decode_utf8(raw: bytes, file: str | Path) -> str:
    """The text of a recipe file; BadInput with the line and column of the first byte that is not UTF-8."""
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):  # fmt: skip
        if raw.startswith(bom):
            raise BadInput(
                f"the recipe is {name} text; loracook reads UTF-8",
                file=file,
                fix=f"save it as UTF-8 (e.g. iconv -f {name} -t UTF-8)",
            )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        error = BadInput(
            f"the recipe is not UTF-8 text (byte 0x{raw[exc.start]:02x} cannot be decoded)",
            file=file,
            fix="save it as UTF-8 (e.g. iconv -f latin1 -t UTF-8 recipe.yaml)",
        )
        error.line, error.column = line, column
        raise error from None


def _refuse_deep_flow(text: str, file: Path) -> None:
    """Refuse more than MAX_DEPTH unclosed ``[``/``{`` before PyYAML sees the text: its scanner keeps a possible
    key per open bracket and checks them all at every token, so deep flow nesting costs it quadratic time
    before the composer's depth limit is ever reached. Counted everywhere, quotes included (a quote-aware count
    could be fooled by an apostrophe in a plain scalar); no real recipe has 64 unclosed brackets in a string."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    for index, character in enumerate(text):
        if character in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                error = BadInput(
                    f"the YAML nests more than {MAX_DEPTH} brackets deep",
                    file=file,
                    fix="a recipe needs a few levels; is this the right file?",
                )
                error.line = text.count("\n", 0, index) + 1
                error.column = index - (text.rfind("\n", 0, index) + 1) + 1
                raise error
        elif character in "]}" and depth:
            depth -= 1


# -------------------------------------------------------------------------------------------- composition


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer, counting aliases, depth and expanded size as it builds (over any event source)."""

    def __init__(self, file: Path) -> None:
        super().__init__()
        self._file = file
        self._depth = 0
        self._aliases = 0
        self._open: set[int] = set()  # collections being composed: an alias to one of them is recursive
        self._sizes: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._check_alias(self.peek_event())
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise self._refuse(
                f"the YAML nests more than {MAX_DEPTH} levels deep",
                self.peek_event().start_mark,
                "a recipe needs a few levels; is this the right file?",
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _check_alias(self, event: yaml.AliasEvent) -> None:
        node = self.anchors.get(event.anchor)
        if node is None:
            return  # PyYAML reports the undefined alias
        if id(node) in self._open:
            raise self._refuse(
                f"recursive alias *{event.anchor}: it refers to a value that contains it",
                event.start_mark,
                "an alias must refer to a value defined before it, outside it",
            )
        self._aliases += 1
        if self._aliases > MAX_ALIASES:
            raise self._refuse(
                f"more than {MAX_ALIASES} YAML aliases (*name)",
                event.start_mark,
                "write the values out, or share fewer of them",
            )

    def compose_sequence_node(self, anchor: Any) -> Any:
        start = self.get_event()
        tag = start.tag
        if tag is None or tag == "!":
            tag = self.resolve(yaml.SequenceNode, None, start.implicit)
        node = yaml.SequenceNode(tag, [], start.start_mark, None, flow_style=start.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        self._open.add(id(node))
        size, index = 1, 0
        while not self.check_event(yaml.SequenceEndEvent):
            child = self.compose_node(node, index)
            node.value.append(child)
            size = self._grow(size, child)
            index += 1
        node.end_mark = self.get_event().end_mark
        self._close(node, size)
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        start = self.get_event()
        tag = start.tag
        if tag is None or tag == "!":
            tag = self.resolve(yaml.MappingNode, None, start.implicit)
        node = yaml.MappingNode(tag, [], start.start_mark, None, flow_style=start.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        self._open.add(id(node))
        size = 1
        while not self.check_event(yaml.MappingEndEvent):
            key = self.compose_node(node, None)
            value = self.compose_node(node, key)
            node.value.append((key, value))
            size = self._grow(self._grow(size, key), value)
        node.end_mark = self.get_event().end_mark
        self._close(node, size)
        return node

    def _grow(self, size: int, child: Any) -> int:
        size += self._sizes.get(id(child), 1)
        if size > MAX_NODES:
            raise self._refuse(
                f"the YAML expands to more than {MAX_NODES:,} values (aliases count as the copies they make)",
                child.start_mark,
                "this looks like an alias bomb; write the recipe without nested aliases"
                if self._aliases
                else "a recipe holds a few hundred values; is this the right file?",
            )
        return size

    def _close(self, node: Any, size: int) -> None:
        self._open.discard(id(node))
        self._sizes[id(node)] = size

    def _refuse(self, message: str, mark: Any, fix: str) -> BadInput:
        error = BadInput(message, file=self._file, fix=fix)
        error.line, error.column = mark.line + 1, mark.column + 1
        return error


try:  # libyaml: scans and parses an order of magnitude faster than pure Python
    from yaml.cyaml import CParser as _CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _CParser = None

if _CParser is not None:

    class _BoundedLoader(
        _CParser, _BoundedComposer, yaml.constructor.SafeConstructor, yaml.resolver.Resolver
    ):
        """libyaml's events, composed by the bounded composer above (libyaml's own composer has no bounds)."""

        get_single_node = yaml.composer.Composer.get_single_node  # not CParser's, which composes in C

        def __init__(self, text: str, file: Path) -> None:
            _CParser.__init__(self, text)
            _BoundedComposer.__init__(self, file)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

else:  # pragma: no cover - PyYAML built without libyaml

    class _BoundedLoader(  # type: ignore[no-redef]
        yaml.reader.Reader,
        yaml.scanner.Scanner,
        yaml.parser.Parser,
        _BoundedComposer,
        yaml.constructor.SafeConstructor,
        yaml.resolver.Resolver,
    ):
        """Pure-Python PyYAML, composed by the bounded composer."""

        def __init__(self, text: str, file: Path) -> None:
            yaml.reader.Reader.__init__(self, text)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            _BoundedComposer.__init__(self, file)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)


# ------------------------------------------------------------------------------------------------ positions


def _positions(root: yaml.Node, file: Path) -> Positions:
    """Where each recipe location is written, walked without recursion. Keys merged in with ``<<`` point at
    their definition and yield to the mapping's own keys; a key written twice in one mapping is an error."""
    positions: Positions = {}
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        positions.setdefault(loc, _mark(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend(_mapping_children(node, loc, positions, file))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*loc, index)) for index, item in enumerate(node.value))
    return positions


def _mapping_children(
    node: yaml.MappingNode, loc: Loc, positions: Positions, file: Path
) -> list[tuple[yaml.Node, Loc]]:
    children: list[tuple[yaml.Node, Loc]] = []
    own: set[str] = set()
    merged: list[yaml.Node] = []
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            merged.append(value_node)
            continue
        key = _key(key_node, file)
        if key in own:
            raise _at(BadInput(f"duplicate key {key!r}", file=file, fix="keep one of them"), key_node)
        own.add(key)
        positions[(*loc, key)] = _mark(key_node)
        children.append((value_node, (*loc, key)))
    for source in _merge_sources(merged):
        for key_node, value_node in source.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # nested merges: the constructor resolves them; locations fall back to the parent
            if key_node.value not in own:
                own.add(key_node.value)
                positions[(*loc, key_node.value)] = _mark(key_node)
                children.append((value_node, (*loc, key_node.value)))
    return children


def _merge_sources(values: list[yaml.Node]) -> list[yaml.MappingNode]:
    """The mappings a ``<<`` key merges in, first one winning (PyYAML's order); others are left to the
    constructor, which reports a merge of something that is not a mapping."""
    sources: list[yaml.MappingNode] = []
    for value in values:
        items = value.value if isinstance(value, yaml.SequenceNode) else [value]
        sources += [item for item in items if isinstance(item, yaml.MappingNode)]
    return sources


def _key(node: yaml.Node, file: Path) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise _at(
            BadInput("a key must be a plain name, not a list or a mapping", file=file, fix="fix the key"),
            node,
        )
    return node.value


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _at(error: BadInput, node: yaml.Node) -> BadInput:
    error.line, error.column = _mark(node)
    return error


# --------------------------------------------------------------------------------------------------- errors


def _marked(exc: yaml.MarkedYAMLError, file: Path) -> BadInput:
    mark = exc.problem_mark or exc.context_mark
    parts = [p for p in (exc.context, exc.problem) if p]
    problem = " ".join(", ".join(parts).split())
    error = BadInput(f"malformed YAML: {problem}", file=file, fix="fix the YAML syntax")
    if mark is not None:
        error.line, error.column = mark.line + 1, mark.column + 1
    return error


def _unreadable(exc: yaml.reader.ReaderError, text: str, file: Path) -> BadInput:
    """A character YAML does not allow. libyaml reports a byte offset in the UTF-8 text, PyYAML a character
    index; both become a line and column."""
    offset = int(exc.position or 0)
    if _CParser is not None:
        offset = len(text.encode("utf-8")[:offset].decode("utf-8", "ignore"))
    position = max(0, min(offset, len(text)))
    character = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
    error = BadInput(
        f"the recipe holds the control character #x{character:04x}, which YAML does not allow",
        file=file,
        fix="remove it (is this a binary file?)",
    )
    error.line = text.count("\n", 0, position) + 1
    error.column = position - (text.rfind("\n", 0, position) + 1) + 1
    return error


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else exc.__class__.__name__)[:200]
