"""keepalived.conf parser: text in, ``ParseResult(config, errors, warnings)`` out.

This module owns the grammar of the configuration lvs-dp reads: keepalived 2.x syntax plus the
Alibaba FULLNAT/SYNPROXY patch (``lb_kind FNAT``, ``local_address_group``, ``laddr_group_name``,
``syn_proxy``) and DPVS's ``proxy_protocol``. The typed result is control/model.py.

Theory of operation
-------------------
The structure is keepalived's check_parser.c without its globals (``current_vs``, ``current_rs``):
every piece of parse state lives in a ``_Ctx`` or a ``_Builder`` created for one parse, so two
parses can run side by side and nothing leaks between them. Three stages:

1. **Reading** (``_Reader``) turns files into a flat stream of items: statement lines (tokens with
   FILE:LINE), ``{`` and ``}``, and file start/end markers. It handles ``include`` (globs and brace
   expressions, relative to the including file, as keepalived does after it chdir()s), both comment
   characters ``#`` and ``!``, quoted strings with escapes, ``@id``/``@^id`` conditional lines and
   ``$NAME=value`` parameters. A brace splits a physical line the way keepalived's read_line() does,
   so ``real_server 10.0.0.1 80 { weight 3 }`` is three statements.
2. **Tree building** (``_build_tree``) matches braces. Each file must balance on its own: a block
   still open at the end of a file is reported *there*, naming the line that opened it, and is
   closed so the including file goes on parsing; a ``}`` with no open block is an error.
3. **Walking** (``_walk``) interprets the tree with a keyword table per block level (root,
   virtual_server, real_server, one per checker, url, SMTP host), declared once in ``_grammar()``.
   Aliases (``lb_algo``/``lvs_sched``, ``retry``/``nb_get_retry``) map to the same entry. A block
   level has a ``begin`` (parse the header: ``virtual_server 10.0.0.1 80``) and an ``end`` (the
   end-of-block validator: keepalived's vs_end_handler / rs_end_handler). Blocks lvs-dp keeps but
   does not interpret (VRRP, static routes, global_defs...) are handed over whole as raw trees.

Diagnostics
-----------
Nothing stops at the first problem: a bad value is reported and that one setting dropped, a bad
header drops its block from the result but the block is still walked so every error inside is
reported too. Severity follows what matters to an operator:

* error: a value keepalived would reject or ignore (non-numeric port, bad address, unknown
  scheduler/forwarding method, weight out of range...), broken structure (unbalanced braces),
  and things lvs-dp cannot run (FNAT without a local address group);
* warning: what keepalived itself only warns about (unknown keyword, protocol on a fwmark service,
  quorum above the total weight...), and places where lvs-dp reads more than keepalived would:
  several keywords on one line (keepalived reads the first and silently drops the rest).
"""

from __future__ import annotations

import dataclasses
import glob
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple

from control.model import (
    IPVS_SVC_PERSISTENT_TIMEOUT, Checker, CheckerHost, Config, Diagnostic,
    GroupMember, Node, RealServer, Url, VirtualServer, VirtualServerGroup, VrrpInstance, VrrpScript,
    VrrpSyncGroup, expand_range)

__all__ = ["ParseResult", "parse_file", "parse_text", "SCHEDULERS", "FORWARDING_METHODS"]

# IPVS schedulers keepalived accepts for lb_algo / lvs_sched (keepalived.conf(5)).
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf",
              "twos")
# Forwarding methods for lb_kind / lvs_method; FULLNAT is accepted as another spelling of FNAT.
FORWARDING_METHODS = ("NAT", "DR", "TUN", "FNAT")
_FORWARDING_ALIASES = {"FULLNAT": "FNAT"}
# Scheduler flags (ipvsadm -b), each a keyword of its own in keepalived 2.x.
_LB_FLAGS = ("hashed", "flag-1", "flag-2", "flag-3", "sh-port", "sh-fallback", "mh-port",
             "mh-fallback")
_PROTOCOLS = ("TCP", "UDP", "SCTP")
_BOOL = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}
_WEIGHT_MAX = 2**31 - 1         # keepalived's IPVS_WEIGHT_LIMIT (INT_MAX)
_U32_MAX = 2**32 - 1
_INCLUDE_MAX_DEPTH = 32         # include nesting; deeper is surely a loop through symlinks
_PARAM_MAX_DEPTH = 32           # recursive $PARAM replacement

# Root keywords keepalived 2.x knows that lvs-dp keeps as raw trees in Config.other, without a
# warning: they are valid keepalived, lvs-dp simply has no use for them.
_OTHER_ROOTS = ("SSL", "track_file", "vrrp_track_file", "vrrp_track_process", "garp_group",
                "linkbeat_interfaces", "linkbeat_use_polling", "track_group", "bfd_instance",
                "net_namespace", "net_namespace_ipvs", "namespace_with_ipsets", "use_pid_dir",
                "instance", "child_wait_time", "interface_up_down_delays")


@dataclass(frozen=True)
class ParseResult:
    config: Config
    errors: list[Diagnostic]
    warnings: list[Diagnostic]

    @property
    def ok(self) -> bool:
        return not self.errors


def parse_file(path: str, *, config_id: str | None = None) -> ParseResult:
    """Parse a keepalived.conf and everything it includes. ``config_id`` selects ``@id`` lines
    (keepalived -i); like keepalived it defaults to the first part of the host name."""
    ctx = _Ctx(config_id)
    items = _Reader(ctx).read_main_file(path)
    return _finish(ctx, items)


def parse_text(text: str, filename: str = "<string>", *, config_id: str | None = None) -> ParseResult:
    """Parse configuration text; ``filename`` names it in diagnostics and anchors relative
    includes (its directory, the current directory for ``<string>``)."""
    ctx = _Ctx(config_id)
    items = _Reader(ctx).read_main_text(text, filename)
    return _finish(ctx, items)


def _finish(ctx: "_Ctx", items: list) -> ParseResult:
    tree = _build_tree(ctx, items)
    _walk(ctx, _ROOT, _Builder("root", "", 0), tree)
    _check_references(ctx)
    cfg = Config(
        global_defs=ctx.global_defs, services=tuple(ctx.services), groups=ctx.groups,
        local_address_groups=ctx.laddr_groups, vrrp_instances=ctx.vrrp_instances,
        vrrp_sync_groups=ctx.vrrp_sync_groups, vrrp_scripts=ctx.vrrp_scripts,
        static_ipaddress=tuple(ctx.static["static_ipaddress"]),
        static_routes=tuple(ctx.static["static_routes"]),
        static_rules=tuple(ctx.static["static_rules"]), other=tuple(ctx.other),
        synproxy=dict(ctx.synproxy))
    return ParseResult(cfg, ctx.sorted(ctx.errors), ctx.sorted(ctx.warnings))


# =====================================================================================================
# Parse state: one _Ctx per parse (keepalived keeps all of this in globals).
# =====================================================================================================


class _Ctx:
    def __init__(self, config_id: str | None):
        if config_id is None:
            config_id = socket.gethostname().split(".")[0]
        self.config_id = config_id
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []
        self.global_defs: dict = {}
        self.services: list[VirtualServer] = []
        self.groups: dict[str, VirtualServerGroup] = {}
        self.laddr_groups: dict[str, tuple[str, ...]] = {}
        self.vrrp_instances: dict[str, VrrpInstance] = {}
        self.vrrp_sync_groups: dict[str, VrrpSyncGroup] = {}
        self.vrrp_scripts: dict[str, VrrpScript] = {}
        self.static: dict[str, list[str]] = {"static_ipaddress": [], "static_routes": [],
                                             "static_rules": []}
        self.other: list[Node] = []
        self.synproxy: dict[str, int] = {}     # synproxy { } block: field -> value
        # References checked once everything is read (a group may be defined after its user):
        # (kind, name, file, line)
        self.refs: list[tuple[str, str, str, int]] = []
        self.files: list[str] = []      # every file read, in order (sorts the diagnostics)

    def sorted(self, diags: list[Diagnostic]) -> list[Diagnostic]:
        """By file (in the order they were first read), then line: the order an operator reads."""
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(diags, key=lambda d: (order.get(d.file, len(order)), d.line))

    def error(self, file: str, line: int, msg: str) -> None:
        self.errors.append(Diagnostic(file, line, msg, "error"))

    def warning(self, file: str, line: int, msg: str) -> None:
        self.warnings.append(Diagnostic(file, line, msg, "warning"))


# =====================================================================================================
# Stage 1: reading files into items
# =====================================================================================================


class _Tok(NamedTuple):
    text: str
    quoted: bool        # came (partly) from quotes: never taken for a keyword or a brace


class _Line(NamedTuple):
    toks: tuple[_Tok, ...]
    file: str
    line: int


class _Brace(NamedTuple):
    ch: str
    file: str
    line: int


class _FileStart(NamedTuple):
    file: str


class _FileEnd(NamedTuple):
    file: str
    line: int           # last line of the file, where "missing '}'" is reported


_INCLUDE_WORDS = ("include", "includer", "includem", "includew", "includeb", "includea")
_PARAM_DEF = re.compile(r"^\s*\$([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_PARAM_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)(?=\s|$)")
_ESCAPES = {"a": "\a", "b": "\b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
            "v": "\v"}


def _strip_comment(s: str) -> str:
    """Cut a line at the first '#' or '!' outside quotes (keepalived: comments can start anywhere)."""
    quote = None
    i = 0
    while i < len(s):
        c = s[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "#!":
            return s[:i]
        i += 1
    return s


def _expand_braces(pattern: str) -> list[str]:
    """csh-style {a,b} expansion, which keepalived's include gets from glob(GLOB_BRACE)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m or "," not in m.group(1):
        return [pattern]
    out = []
    for alt in m.group(1).split(","):
        out.extend(_expand_braces(pattern[:m.start()] + alt + pattern[m.end():]))
    return out


class _Reader:
    """Files -> items. Holds only what one parse needs: the include stack and the parameters."""

    def __init__(self, ctx: _Ctx):
        self.ctx = ctx
        self.stack: list[str] = []          # realpaths of the files being read (include loops)
        self.params: dict[str, list[str]] = {}

    # --- files ---------------------------------------------------------------------------------

    def read_main_file(self, path: str) -> list:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            self.ctx.error(path, 0, f"cannot read configuration: {e.strerror}")
            return []
        self.stack.append(os.path.realpath(path))
        return self._read_text(text, path)

    def read_main_text(self, text: str, filename: str) -> list:
        return self._read_text(text, filename)

    def _read_text(self, text: str, shown: str) -> list:
        lines = text.splitlines()
        self.ctx.files.append(shown)
        items: list = [_FileStart(shown)]
        i = 0
        while i < len(lines):
            lineno = i + 1
            raw = _strip_comment(lines[i].rstrip("\r"))
            i += 1
            words = raw.split()
            if words and words[0] in _INCLUDE_WORDS:
                # keepalived spots include before conditionals and parameters (keepalived.conf(5))
                items.extend(self._include(words[0], raw.split(None, 1)[1:], shown, lineno))
                continue
            m = _PARAM_DEF.match(raw)
            if m and m.group(2).rstrip().endswith("\\") and not m.group(2).rstrip()[:-1].strip():
                # multi-line definition: "$NAME= \" then lines ending in "\", the last without
                body = []
                while i < len(lines):
                    cont = _strip_comment(lines[i].rstrip("\r")).rstrip()
                    i += 1
                    if cont.endswith("\\"):
                        body.append(cont[:-1])
                    else:
                        body.append(cont)
                        break
                self.params[m.group(1)] = body
                continue
            self._line(raw, shown, lineno, items, 0)
        items.append(_FileEnd(shown, max(len(lines), 1)))
        return items

    def _include(self, word: str, rest: list[str], shown: str, lineno: int) -> list:
        ctx = self.ctx
        # braces are part of the name here ({a,b} alternatives), not blocks
        toks = self._tokenize(rest[0], shown, lineno, braces=False) if rest else []
        names = [t.text for t in toks if isinstance(t, _Tok)]
        if not names:
            ctx.error(shown, lineno, f"{word}: needs a file name")
            return []
        pattern = names[0]
        base = os.path.dirname(shown) if shown != "<string>" else ""
        full = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
        if len(self.stack) >= _INCLUDE_MAX_DEPTH:
            ctx.error(shown, lineno, f"{word} '{pattern}': includes nested more than "
                                     f"{_INCLUDE_MAX_DEPTH} deep")
            return []
        is_glob = any(c in full for c in "*?[") or full != _expand_braces(full)[0]
        paths: list[str] = []
        for alt in _expand_braces(full):
            paths.extend(sorted(glob.glob(alt)) if any(c in alt for c in "*?[") else [alt])
        paths = [p for p in paths if not is_glob or os.path.isfile(p)]
        if not paths:
            # A pattern matching nothing is the conf.d idiom: a warning (keepalived's plain include
            # is silent). A missing plain name is kept in `paths` and fails the open() below as an
            # error: that one is surely a typo.
            ctx.warning(shown, lineno, f"{word} '{pattern}': no file matches")
            return []
        items: list = []
        for p in paths:
            real = os.path.realpath(p)
            if real in self.stack:
                ctx.error(shown, lineno, f"{word} '{pattern}': '{p}' includes itself")
                continue
            try:
                with open(p, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError as e:
                ctx.error(shown, lineno, f"{word} '{pattern}': cannot read '{p}': {e.strerror}")
                continue
            self.stack.append(real)
            items.extend(self._read_text(text, p))
            self.stack.pop()
        return items

    # --- one logical line ----------------------------------------------------------------------

    def _conditional_ok(self, text: str) -> bool:
        s = text.lstrip()
        if not s.startswith("@"):
            return True
        word = s[1:].split(None, 1)[0] if len(s) > 1 and not s[1].isspace() else ""
        if word.startswith("^"):
            return word[1:] != self.ctx.config_id
        return word == self.ctx.config_id

    def _line(self, text: str, shown: str, lineno: int, items: list, depth: int) -> None:
        s = text.lstrip()
        if s.startswith("@"):
            if not self._conditional_ok(s):
                return
            parts = s.split(None, 1)
            text = parts[1] if len(parts) > 1 else ""
        m = _PARAM_DEF.match(text)
        if m:
            self.params[m.group(1)] = [m.group(2).strip()]
            return
        if "$" in text:
            text, multi = self._substitute(text, shown, lineno)
            if multi:
                if depth >= _PARAM_MAX_DEPTH:
                    self.ctx.error(shown, lineno, "parameter expansion nested too deep")
                    return
                for piece in text.split("\n"):
                    self._line(piece, shown, lineno, items, depth + 1)
                return
        if text.lstrip().startswith(("~SEQ", "~LST")):
            self.ctx.error(shown, lineno, "~SEQ/~LST blocks are not supported by lvs-dp: "
                                          "write the lines out")
            return
        line_toks: list[_Tok] = []
        for t in self._tokenize(text, shown, lineno):
            if isinstance(t, _Tok):
                line_toks.append(t)
                continue
            if line_toks:
                items.append(_Line(tuple(line_toks), shown, lineno))
                line_toks = []
            items.append(_Brace(t, shown, lineno))
        if line_toks:
            items.append(_Line(tuple(line_toks), shown, lineno))

    def _substitute(self, text: str, shown: str, lineno: int) -> tuple[str, bool]:
        """Replace $NAME / ${NAME} with defined parameters, recursively; undefined ones stay as
        written (keepalived: existing '$' in scripts are left alone). Returns (text, multi-line)."""
        predefined = {"_PWD": os.path.dirname(os.path.abspath(shown)), "_INSTANCE": self.ctx.config_id,
                      "_HASH": "#", "_BANG": "!"}
        multi = False

        def repl(m: re.Match) -> str:
            nonlocal multi
            name = m.group(1) or m.group(2)
            if name in self.params:
                body = self.params[name]
                multi = multi or len(body) > 1
                return "\n".join(body)
            if name in predefined:
                return predefined[name]
            return m.group(0)

        for _ in range(_PARAM_MAX_DEPTH):
            new = _PARAM_REF.sub(repl, text)
            if new == text:
                return text, multi
            text = new
        self.ctx.error(shown, lineno, "parameter expansion does not terminate")
        return text, multi

    def _tokenize(self, text: str, shown: str, lineno: int, braces: bool = True) -> list:
        """Words, with quoted parts ("a b" or 'a b', quotes removed, escapes decoded) glued to the
        word they touch, and '{' '}' as separate items unless quoted (or ``braces`` is False)."""
        out: list = []
        cur: list[str] = []
        in_word = quoted = False
        i, n = 0, len(text)

        def flush():
            nonlocal cur, in_word, quoted
            if in_word:
                out.append(_Tok("".join(cur), quoted))
            cur, in_word, quoted = [], False, False

        while i < n:
            c = text[i]
            if c in " \t\f\v":
                flush()
                i += 1
            elif c in "{}" and braces:
                flush()
                out.append(c)
                i += 1
            elif c in "\"'":
                in_word = quoted = True
                j = i + 1
                while j < n and text[j] != c:
                    if text[j] == "\\" and j + 1 < n:
                        ch, j = self._escape(text, j + 1)
                        cur.append(ch)
                        continue
                    cur.append(text[j])
                    j += 1
                if j >= n:
                    self.ctx.error(shown, lineno, f"unterminated quoted string (missing {c})")
                i = j + 1
            else:
                cur.append(c)
                in_word = True
                i += 1
        flush()
        return out

    @staticmethod
    def _escape(text: str, j: int) -> tuple[str, int]:
        """Decode the escape whose letter is at text[j]; return (char, index after it)."""
        c = text[j]
        if c in _ESCAPES:
            return _ESCAPES[c], j + 1
        if c == "x":
            m = re.match(r"[0-9a-fA-F]+", text[j + 1:])
            if m:
                return chr(int(m.group(0), 16) & 0xFF), j + 1 + len(m.group(0))
        if c in "01234567":
            m = re.match(r"[0-7]{1,3}", text[j:])
            return chr(int(m.group(0), 8) & 0xFF), j + len(m.group(0))
        if c == "c" and j + 1 < len(text):
            return chr(ord(text[j + 1].upper()) ^ 0x40), j + 2
        return c, j + 1


# =====================================================================================================
# Stage 2: matching braces into a tree of statements
# =====================================================================================================


@dataclass
class _Stmt:
    """A statement during the parse: ``kw args...`` and, if a '{' followed it, its children."""

    toks: list[_Tok]
    file: str
    line: int
    children: list["_Stmt"] | None = None

    @property
    def kw(self) -> str:
        return self.toks[0].text

    @property
    def args(self) -> list[str]:
        return [t.text for t in self.toks[1:]]

    @property
    def text(self) -> str:
        return " ".join(t.text for t in self.toks)

    def node(self) -> Node:
        kids = None if self.children is None else tuple(c.node() for c in self.children)
        return Node(self.kw, tuple(self.args), self.file, self.line, kids)


def _build_tree(ctx: _Ctx, items: list) -> list[_Stmt]:
    root = _Stmt([_Tok("<root>", False)], "", 0, [])
    stack = [root]                      # open blocks, innermost last
    bases: list[int] = []               # len(stack) when each file being read began
    last: _Stmt | None = None           # the statement a '{' would open
    for it in items:
        if isinstance(it, _FileStart):
            bases.append(len(stack))
            last = None
        elif isinstance(it, _FileEnd):
            base = bases.pop()
            while len(stack) > base:
                st = stack.pop()
                if st.toks:         # anonymous blocks (after a stray '{') were reported already
                    ctx.error(it.file, it.line, f"missing '}}': block '{st.kw}' opened at line "
                                                f"{st.line} is not closed")
            last = None
        elif isinstance(it, _Line):
            st = _Stmt(list(it.toks), it.file, it.line)
            stack[-1].children.append(st)
            last = st
        elif it.ch == "{":
            if last is None:
                ctx.error(it.file, it.line, "unexpected '{' (no keyword before it)")
                anon = _Stmt([], it.file, it.line, [])      # swallow the block, keep balance
                stack.append(anon)
            else:
                last.children = []
                stack.append(last)
            last = None
        else:
            if len(stack) <= (bases[-1] if bases else 1):
                ctx.error(it.file, it.line, "unbalanced '}': no block is open here")
            else:
                stack.pop()
            last = None
    return root.children


# =====================================================================================================
# Stage 3: walking the tree with a keyword table per level
# =====================================================================================================


class _Builder:
    """Scratch space for one block while it is walked: the fields read so far (names as in the
    model), the line of each keyword seen (duplicates), and lists filled by sub-blocks."""

    def __init__(self, kind: str, file: str, line: int):
        self.kind = kind
        self.file = file
        self.line = line
        self.ok = True                  # header valid: the block goes into the result
        self.f: dict = {}
        self.extra: dict = {}
        self.seen: dict[str, int] = {}
        self.lines: dict[str, int] = {}  # field -> line it was set on (for later diagnostics)
        self.children: list = []


@dataclass(frozen=True)
class _Kw:
    """One keyword of a level. ``min_args``/``max_args`` (None: the rest of the line) let the walker
    split ``delay_loop 6 lb_algo rr`` into two statements; optional arguments are never taken from
    a word that is itself a keyword of the level."""

    name: str
    handler: Callable | None = None
    min_args: int = 1
    max_args: int | None = 1
    level: "_Level | None" = None
    raw: bool = False               # the handler gets the statement and its block uninterpreted
    repeat: bool = False            # may appear several times in one block


@dataclass(frozen=True)
class _Level:
    name: str
    keywords: Mapping[str, _Kw]
    begin: Callable                 # (ctx, parent_builder, stmt) -> _Builder
    end: Callable                   # (ctx, parent_builder, builder) -> None


def _walk(ctx: _Ctx, level: _Level, b: _Builder, stmts: list[_Stmt]) -> None:
    for st in stmts:
        for piece in _split(ctx, level, st):
            _dispatch(ctx, level, b, piece)


def _split(ctx: _Ctx, level: _Level, st: _Stmt) -> list[_Stmt]:
    """Cut a statement holding several ``keyword value`` pairs into one statement each. keepalived
    hands a whole line to the first keyword's handler, which reads its own arguments and drops the
    rest, so lvs-dp reads them but warns: the same file would mean less to keepalived."""
    kws = level.keywords
    toks = st.toks
    pieces: list[_Stmt] = []
    i = 0
    while True:
        kw = None if toks[i].quoted else kws.get(toks[i].text)
        if kw is None or kw.raw or kw.max_args is None:
            pieces.append(_Stmt(toks[i:], st.file, st.line))
            break
        j, n = i + 1, 0
        while j < len(toks) and n < kw.max_args:
            if n >= kw.min_args and not toks[j].quoted and toks[j].text in kws:
                break
            j += 1
            n += 1
        pieces.append(_Stmt(toks[i:j], st.file, st.line))
        if j == len(toks):
            break
        rest = " ".join(t.text for t in toks[j:])
        if toks[j].quoted or toks[j].text not in kws:
            ctx.warning(st.file, st.line, f"'{pieces[-1].text}': extra '{rest}' ignored "
                                          f"(as keepalived does)")
            break
        if len(pieces) == 1:
            ctx.warning(st.file, st.line, f"'{rest}' follows '{pieces[0].text}' on the same line: "
                                          f"keepalived ignores it, lvs-dp reads it")
        i = j
    pieces[-1].children = st.children
    return pieces


def _dispatch(ctx: _Ctx, level: _Level, b: _Builder, st: _Stmt) -> None:
    kw = None if st.toks[0].quoted else level.keywords.get(st.kw)
    if kw is None:
        ctx.warning(st.file, st.line, f"unknown keyword '{st.kw}'")
        return
    if kw.raw:
        kw.handler(ctx, b, st)
        return
    nargs = len(st.toks) - 1
    if nargs < kw.min_args:
        ctx.error(st.file, st.line, f"{st.kw}: missing value" if kw.min_args == 1 else
                  f"{st.kw}: needs {kw.min_args} values")
        return
    if not kw.repeat:
        if kw.name in b.seen:
            ctx.warning(st.file, st.line, f"{st.kw}: given again (first at line {b.seen[kw.name]}); "
                                          f"the last one is used")
        b.seen[kw.name] = st.line
    if kw.level is not None:
        if st.children is None:
            ctx.error(st.file, st.line, f"{st.kw}: needs a {{ }} block")
            return
        child = kw.level.begin(ctx, b, st)
        _walk(ctx, kw.level, child, st.children)
        kw.level.end(ctx, b, child)
        return
    if st.children is not None:
        ctx.error(st.file, st.line, f"{st.kw}: takes no {{ }} block")
    kw.handler(ctx, b, st)


# --- value readers: each reports its own error and returns None on a bad value ------------------------


def _int(ctx: _Ctx, st: _Stmt, text: str, lo: int, hi: int, what: str | None = None) -> int | None:
    what = what or st.kw
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        ctx.error(st.file, st.line, f"{what}: invalid number '{text}'")
        return None
    v = int(text)
    if not lo <= v <= hi:
        ctx.error(st.file, st.line, f"{what}: {text} is out of range ({lo}-{hi})")
        return None
    return v


def _timer(ctx: _Ctx, st: _Stmt, text: str, positive: bool) -> float | None:
    try:
        v = float(text)
        if not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", text) or (positive and v <= 0):
            raise ValueError
    except ValueError:
        ctx.error(st.file, st.line, f"{st.kw}: invalid time '{text}' (seconds"
                                    f"{', more than 0' if positive else ''})")
        return None
    return v


def _port(ctx: _Ctx, st: _Stmt, text: str, allow_zero: bool = False,
          what: str | None = None) -> int | None:
    if re.fullmatch(r"[0-9]+", text) and (allow_zero or int(text) >= 1) and int(text) <= 65535:
        return int(text)
    ctx.error(st.file, st.line, f"{what or st.kw}: invalid port '{text}' (expected 1-65535)")
    return None


def _ip(ctx: _Ctx, st: _Stmt, text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        ctx.error(st.file, st.line, f"{st.kw}: invalid IP address '{text}'")
        return None


def _bool(ctx: _Ctx, st: _Stmt) -> bool | None:
    """A flag keyword with an optional <BOOL>: ``alpha`` or ``alpha off``."""
    if len(st.toks) < 2:
        return True
    v = _BOOL.get(st.args[0].lower())
    if v is None:
        ctx.error(st.file, st.line, f"{st.kw}: invalid boolean '{st.args[0]}' "
                                    f"(expected on|off|true|false|yes|no)")
    return v


def _rest(st: _Stmt) -> str:
    """The arguments as one string: a quoted script keeps its spaces, an unquoted one is rejoined."""
    return " ".join(st.args)


# --- handler factories -------------------------------------------------------------------------------


def _set(field_: str, read: Callable) -> Callable:
    def handler(ctx, b, st):
        v = read(ctx, st)
        if v is not None:
            b.f[field_] = v
            b.lines[field_] = st.line
    return handler


def _h_int(field_, lo, hi):
    return _set(field_, lambda ctx, st: _int(ctx, st, st.args[0], lo, hi))


def _h_timer(field_, positive=False):
    return _set(field_, lambda ctx, st: _timer(ctx, st, st.args[0], positive))


def _h_port(field_):
    return _set(field_, lambda ctx, st: _port(ctx, st, st.args[0]))


def _h_ip(field_):
    return _set(field_, lambda ctx, st: _ip(ctx, st, st.args[0]))


def _h_flag(field_):
    return _set(field_, _bool)


def _h_str(field_):
    return _set(field_, lambda ctx, st: st.args[0])


def _h_rest(field_):
    return _set(field_, lambda ctx, st: _rest(st))


def _h_choice(field_, choices, fold=str, label="value"):
    def read(ctx, st):
        v = fold(st.args[0])
        if v in choices:
            return v
        ctx.error(st.file, st.line, f"{st.kw}: unknown {label} '{st.args[0]}' "
                                    f"(expected {', '.join(choices)})")
        return None
    return _set(field_, read)


def _h_extra(ctx, b, st):
    """A keyword keepalived knows and lvs-dp keeps without modelling."""
    b.extra[st.kw] = tuple(st.args)


def _h_extra_bool(ctx, b, st):
    if _bool(ctx, st) is not None:
        b.extra[st.kw] = tuple(st.args)


def _h_extra_int(lo, hi):
    def handler(ctx, b, st):
        if _int(ctx, st, st.args[0], lo, hi) is not None:
            b.extra[st.kw] = tuple(st.args)
    return handler


def _h_extra_choice(choices):
    def handler(ctx, b, st):
        if st.args[0] in choices:
            b.extra[st.kw] = tuple(st.args)
        else:
            ctx.error(st.file, st.line, f"{st.kw}: unknown value '{st.args[0]}' "
                                        f"(expected {', '.join(choices)})")
    return handler


def _read_forwarding(ctx, st):
    v = _FORWARDING_ALIASES.get(st.args[0], st.args[0])
    if v not in FORWARDING_METHODS:
        ctx.error(st.file, st.line, f"{st.kw}: unknown forwarding method '{st.args[0]}' "
                                    f"(expected NAT, DR, TUN or FNAT)")
        return None
    if v != "TUN" and len(st.args) > 1:
        ctx.warning(st.file, st.line, f"{st.kw}: extra '{' '.join(st.args[1:])}' ignored "
                                      f"(tunnel options are for TUN only)")
    return v


def _h_forwarding(ctx, b, st):
    v = _read_forwarding(ctx, st)
    if v is None:
        return
    b.f["lb_kind"] = v
    b.lines["lb_kind"] = st.line
    if v == "TUN" and len(st.args) > 1:     # type ipip|gue port N|gre [nocsum|csum|remcsum]
        b.extra["tunnel"] = tuple(st.args[1:])


def _h_lb_flag(ctx, b, st):
    """hashed, flag-1..3, sh-port, sh-fallback, mh-port, mh-fallback: one keyword per flag."""
    if len(st.toks) > 1 and not _bool(ctx, st):     # "sh-port off", or a bad boolean (reported)
        return
    flags = b.f.setdefault("lb_flags", [])
    if st.kw not in flags:
        flags.append(st.kw)
    b.lines[st.kw] = st.line


def _h_legacy_lb_flags(ctx, b, st):
    """``lb_flags flag-1 sh-port ...``: a short-lived keepalived spelling (2016) of the flags."""
    ctx.warning(st.file, st.line, f"{st.kw}: keepalived 2.x has no '{st.kw}': write each flag as "
                                  f"its own keyword ({', '.join(_LB_FLAGS)}, ops)")
    for a in st.args:
        if a in ("ops", "one-packet"):
            b.f["ops"] = True
        elif a in _LB_FLAGS:
            flags = b.f.setdefault("lb_flags", [])
            if a not in flags:
                flags.append(a)
            b.lines[a] = st.line
        else:
            ctx.error(st.file, st.line, f"{st.kw}: unknown flag '{a}' "
                                        f"(expected {', '.join(_LB_FLAGS)}, ops)")


def _h_persistence_timeout(ctx, b, st):
    # A bare `persistence_timeout` means IPVS's default (ipvsadm -p without a value).
    v = IPVS_SVC_PERSISTENT_TIMEOUT if len(st.toks) < 2 else _int(ctx, st, st.args[0], 1, _U32_MAX)
    if v is not None:
        b.f["persistence_timeout"] = v


def _h_persistence_granularity(ctx, b, st):
    text = st.args[0]
    if "." in text:
        try:
            mask = int(ipaddress.IPv4Address(text))
        except ValueError:
            ctx.error(st.file, st.line, f"{st.kw}: invalid netmask '{text}'")
            return
        inv = ~mask & 0xFFFFFFFF
        if inv & (inv + 1):             # ones then zeros only: 255.255.255.0 yes, 255.0.255.0 no
            ctx.error(st.file, st.line, f"{st.kw}: netmask '{text}' is not contiguous")
            return
    elif _int(ctx, st, text, 1, 128) is None:   # IPv6: a prefix length
        return
    b.f["persistence_granularity"] = text


def _h_sorry_server(ctx, b, st):
    addr = _ip(ctx, st, st.args[0])
    port = _port(ctx, st, st.args[1], allow_zero=True) if len(st.args) > 1 else None
    if addr is not None and (len(st.args) < 2 or port is not None):
        b.f["sorry_server"] = (addr, port or None)
        b.lines["sorry_server"] = st.line


def _h_sorry_inhibit(ctx, b, st):
    v = _bool(ctx, st)
    if v is not None:
        b.f["sorry_server_inhibit"] = v
        b.lines["sorry_server_inhibit"] = st.line


def _h_quorum(ctx, b, st):
    v = _int(ctx, st, st.args[0], 1, _U32_MAX)
    if v is not None:
        b.f["quorum"] = v


def _h_laddr_group_name(ctx, b, st):
    b.f["laddr_group_name"] = st.args[0]
    b.lines["laddr_group_name"] = st.line


def _h_proxy_protocol(ctx, b, st):
    v = st.args[0].lower()
    if v in ("v1", "v2"):
        b.f["proxy_protocol"] = v
    elif v in ("disable", "none", "off"):
        b.f["proxy_protocol"] = None
    else:
        ctx.error(st.file, st.line, f"{st.kw}: unknown value '{st.args[0]}' (expected v1 or v2)")
        return
    b.lines["proxy_protocol"] = st.line


def _h_ip_family(ctx, b, st):
    if st.args[0] not in ("inet", "inet6"):
        ctx.error(st.file, st.line, f"{st.kw}: unknown address family '{st.args[0]}' "
                                    f"(expected inet or inet6)")
        return
    b.extra[st.kw] = tuple(st.args)


def _h_user(ctx, b, st):
    b.f["user"] = _rest(st)


def _h_status_code(ctx, b, st):
    codes = []
    for t in st.args:
        m = re.fullmatch(r"([0-9]{3})(?:-([0-9]{3}))?", t)
        lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
        if not m or not 100 <= lo <= hi <= 599:
            ctx.error(st.file, st.line, f"status_code: invalid code '{t}' "
                                        f"(expected 100-599 or a range like 200-299)")
            continue
        codes.append((lo, hi))
    if codes:
        b.f["status_code"] = tuple(codes)


def _h_digest(ctx, b, st):
    if not re.fullmatch(r"[0-9a-fA-F]{32}", st.args[0]):
        ctx.error(st.file, st.line, f"digest: '{st.args[0]}' is not an MD5 sum "
                                    f"(32 hex digits, from genhash)")
        return
    b.f["digest"] = st.args[0].lower()


# --- levels: begin (header) and end (validation) handlers ----------------------------------------------


def _begin_vs(ctx, parent, st):
    b = _Builder("virtual_server", st.file, st.line)
    a = st.args
    if not a:
        ctx.error(st.file, st.line, "virtual_server: needs an address and port, "
                                    "'fwmark N' or 'group NAME'")
        b.ok = False
    elif a[0] == "fwmark":
        v = _int(ctx, st, a[1], 1, _U32_MAX, "virtual_server fwmark") if len(a) > 1 else None
        if len(a) < 2:
            ctx.error(st.file, st.line, "virtual_server fwmark: missing mark")
        b.ok = v is not None
        b.f["fwmark"] = v
    elif a[0] == "group":
        if len(a) < 2:
            ctx.error(st.file, st.line, "virtual_server group: missing group name")
            b.ok = False
        else:
            b.f["group"] = a[1]
            ctx.refs.append(("virtual_server_group", a[1], st.file, st.line))
    else:
        addr = _ip(ctx, st, a[0])
        port = _port(ctx, st, a[1], allow_zero=True) if len(a) > 1 else None
        b.ok = addr is not None and (len(a) < 2 or port is not None)
        b.f["addr"], b.f["port"] = addr, port or None
    extra = a[2:]
    if extra:
        ctx.warning(st.file, st.line, f"virtual_server: extra '{' '.join(extra)}' ignored")
    return b


def _begin_rs(ctx, vs, st):
    b = _Builder("real_server", st.file, st.line)
    a = st.args
    if not a:
        ctx.error(st.file, st.line, "real_server: needs an address")
        b.ok = False
        return b
    addr = _ip(ctx, st, a[0])
    port = _port(ctx, st, a[1], allow_zero=True) if len(a) > 1 else None
    b.ok = addr is not None and (len(a) < 2 or port is not None)
    b.f["addr"], b.f["port"] = addr, port or None
    if len(a) > 2:
        ctx.warning(st.file, st.line, f"real_server: extra '{' '.join(a[2:])}' ignored")
    return b


def _end_rs(ctx, vs, b):
    if b.ok:
        vs.children.append(b)


def _begin_checker(ctx, rs, st):
    b = _Builder(st.kw, st.file, st.line)
    if st.args:
        ctx.warning(st.file, st.line, f"{st.kw}: extra '{' '.join(st.args)}' ignored")
    return b


def _end_checker(ctx, rs, b):
    if b.kind in ("HTTP_GET", "SSL_GET") and not b.children:
        ctx.error(b.file, b.line, f"{b.kind}: no url {{ }} block (keepalived drops the checker)")
        return
    if b.kind == "MISC_CHECK" and not b.f.get("misc_path"):
        ctx.error(b.file, b.line, "MISC_CHECK: no misc_path (keepalived drops the checker)")
        return
    if b.kind == "FILE_CHECK" and "track_file" not in b.extra:
        ctx.error(b.file, b.line, "FILE_CHECK: no track_file (keepalived drops the checker)")
        return
    if b.ok:
        rs.children.append(b)


def _begin_plain(kind):
    def begin(ctx, parent, st):
        b = _Builder(kind, st.file, st.line)
        if st.args:
            ctx.warning(st.file, st.line, f"{st.kw}: extra '{' '.join(st.args)}' ignored")
        return b
    return begin


def _end_url(ctx, ck, b):
    if "path" not in b.f:
        ctx.error(b.file, b.line, "url: no path (keepalived drops the url)")
        return
    ck.children.append(Url(file=b.file, line=b.line, extra=b.extra, **b.f))


def _end_host(ctx, ck, b):
    ck.f.setdefault("hosts", []).append(CheckerHost(file=b.file, line=b.line, **b.f))


# Per-kind defaults keepalived applies when nothing on the checker, real or virtual server says.
def _default_retry(kind: str) -> int:
    return {"DNS_CHECK": 3, "MISC_CHECK": 0}.get(kind, 1)


def _default_delay_before_retry(kind: str, delay_loop: float) -> float:
    if kind in ("HTTP_GET", "SSL_GET"):
        return 3.0
    if kind == "DNS_CHECK":
        return delay_loop
    return 1.0


_VS_FIELDS = {f.name for f in dataclasses.fields(VirtualServer)}
_RS_FIELDS = {f.name for f in dataclasses.fields(RealServer)}
_CK_FIELDS = {f.name for f in dataclasses.fields(Checker)}


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _end_vs(ctx, root, b):
    """keepalived's vs_end_handler plus validate_check_config, for one virtual server: inherit
    settings down to real servers and checkers, then check what needs the whole block."""
    f, where = b.f, f"virtual_server {_vs_label(b.f)}"
    is_fwmark = f.get("fwmark") is not None
    is_group = f.get("group") is not None
    proto_given = "protocol" in f

    # A bad header was reported already; warnings about the service's shape would only be noise,
    # but errors inside the block still are (they were reported while walking it).
    shape_warnings = b.ok
    if is_fwmark and proto_given:
        ctx.warning(b.file, b.line, f"{where}: protocol is ignored for a fwmark service")
    if not is_fwmark and not proto_given and shape_warnings:
        # keepalived 2.x leaves the protocol to the kernel, which takes UDP; lvs-dp takes TCP, the
        # protocol every sample and the seed lab mean. Say so, since the two now differ.
        ctx.warning(b.file, b.line, f"{where}: no protocol; lvs-dp uses TCP (keepalived would use "
                                    f"UDP), write 'protocol TCP'")
    lb_algo = f.get("lb_algo", "wlc")
    lb_kind = f.get("lb_kind", "NAT")
    protocol = f.get("protocol", "TCP")

    flags = list(f.get("lb_flags", ()))
    for flag in list(flags):
        sched = flag.split("-")[0]
        if sched in ("sh", "mh") and lb_algo != sched:
            ctx.warning(b.file, b.lines.get(flag, b.line),
                        f"{flag}: only applies to the {sched} scheduler, not {lb_algo} - ignored")
            flags.remove(flag)
    f["lb_flags"] = tuple(flags)
    if f.get("ops") and protocol != "UDP" and not is_fwmark:
        ctx.warning(b.file, b.seen.get("ops", b.line),
                    "ops: one-packet scheduling needs protocol UDP - ignored")
        f["ops"] = False
    if (not f.get("port") and not is_fwmark and not is_group and not f.get("persistence_timeout")
            and shape_warnings):
        ctx.warning(b.file, b.line, f"{where}: no port, which is only valid for a persistent "
                                    f"service; persistence_timeout {IPVS_SVC_PERSISTENT_TIMEOUT} set")
        f["persistence_timeout"] = IPVS_SVC_PERSISTENT_TIMEOUT
    if f.get("persistence_granularity") and not f.get("persistence_timeout"):
        f["persistence_timeout"] = IPVS_SVC_PERSISTENT_TIMEOUT   # keepalived's pgr_handler does it

    # FULLNAT needs local addresses to source connections from: without them lvs-dp cannot run it.
    if lb_kind == "FNAT":
        name = f.get("laddr_group_name")
        if name is None:
            ctx.error(b.file, b.line, f"{where}: lb_kind FNAT needs laddr_group_name")
        else:
            ctx.refs.append(("local_address_group", name, b.file, b.lines["laddr_group_name"]))
    else:
        for key in ("laddr_group_name", "proxy_protocol"):
            if f.get(key) is not None:
                ctx.warning(b.file, b.lines[key], f"{key}: only used with lb_kind FNAT - ignored")
        if f.get("toa"):
            ctx.warning(b.file, b.seen.get("toa", b.line), "toa: only used with lb_kind FNAT - ignored")
    if f.get("syn_proxy") and protocol != "TCP":
        ctx.error(b.file, b.seen.get("syn_proxy", b.line), f"syn_proxy: needs protocol TCP, "
                                                           f"not {protocol}")

    if not b.children:
        if shape_warnings:
            ctx.warning(b.file, b.line, f"{where} has no real servers (keepalived ignores it, "
                                        f"so does lvs-dp)")
        return

    vs_family = _family(f.get("addr"))
    delay_loop = f.get("delay_loop", 60.0)
    real_servers: list[RealServer] = []
    seen_rs: dict[tuple, int] = {}
    for rb in b.children:
        r = rb.f
        kind = r.get("lb_kind", lb_kind)
        key = (r["addr"], r.get("port"))
        if key in seen_rs:
            ctx.warning(rb.file, rb.line, f"real_server {_addr_port(*key)}: duplicate (first at line "
                                          f"{seen_rs[key]}) - ignored, as keepalived does")
            continue
        seen_rs[key] = rb.line
        if kind in ("NAT", "DR") and vs_family and _family(r["addr"]) != vs_family:
            ctx.error(rb.file, rb.line, f"real_server {r['addr']}: address family differs from "
                                        f"the virtual server's ({kind} cannot translate it)")
            continue
        rs_alpha = _first(r.get("alpha"), f.get("alpha"), False)
        checkers = []
        for cb in rb.children:
            c = cb.f
            dl = _first(c.get("delay_loop"), r.get("delay_loop"), delay_loop)
            fields = {k: v for k, v in c.items() if k in _CK_FIELDS}
            fields.update(
                connect_timeout=_first(c.get("connect_timeout"), r.get("connect_timeout"),
                                       f.get("connect_timeout"), 5.0),
                retry=_first(c.get("retry"), r.get("retry"), f.get("retry"), _default_retry(cb.kind)),
                delay_before_retry=_first(c.get("delay_before_retry"), r.get("delay_before_retry"),
                                          f.get("delay_before_retry"),
                                          _default_delay_before_retry(cb.kind, dl)),
                delay_loop=dl,
                warmup=_first(c.get("warmup"), r.get("warmup"), f.get("warmup")),
                alpha=_first(c.get("alpha"), rs_alpha),
                urls=tuple(cb.children), hosts=tuple(c.get("hosts", ())))
            checkers.append(Checker(kind=cb.kind, file=cb.file, line=cb.line, extra=cb.extra,
                                    **fields))
        fields = {k: v for k, v in r.items() if k in _RS_FIELDS}
        fields.update(
            port=r.get("port") if r.get("port") is not None else
            (f.get("port") if not is_fwmark and not is_group else None),
            weight=_first(r.get("weight"), f.get("weight"), 1),
            lb_kind=kind,
            inhibit_on_failure=_first(r.get("inhibit_on_failure"), f.get("inhibit_on_failure"), False),
            alpha=rs_alpha, checkers=tuple(checkers))
        real_servers.append(RealServer(file=rb.file, line=rb.line, extra=rb.extra, **fields))

    sorry = f.get("sorry_server")
    if sorry and vs_family and f.get("lb_kind", "NAT") != "TUN" and _family(sorry[0]) != vs_family:
        ctx.error(b.file, b.lines["sorry_server"], "sorry_server: address family differs from the "
                                                   "virtual server's")
    if f.get("sorry_server_inhibit") and not sorry:
        ctx.warning(b.file, b.lines["sorry_server_inhibit"],
                    "sorry_server_inhibit: no sorry_server - ignored")

    # quorum/hysteresis: keepalived lowers them rather than never bringing the service up.
    weight_sum = sum(rs.weight for rs in real_servers)
    quorum = f.get("quorum", 1)
    if 0 < weight_sum < quorum:
        ctx.warning(b.file, b.line, f"{where}: quorum {quorum} exceeds the total weight of the real "
                                    f"servers {weight_sum}; using {weight_sum}, as keepalived does")
        quorum = f["quorum"] = weight_sum
    if f.get("hysteresis", 0) >= quorum:
        ctx.warning(b.file, b.line, f"{where}: hysteresis {f['hysteresis']} >= quorum {quorum}; "
                                    f"using {quorum - 1}, as keepalived does")
        f["hysteresis"] = quorum - 1

    if not b.ok:
        return
    fields = {k: v for k, v in f.items() if k in _VS_FIELDS}
    ctx.services.append(VirtualServer(file=b.file, line=b.line, extra=b.extra,
                                      real_servers=tuple(real_servers), **fields))


def _vs_label(f: dict) -> str:
    if f.get("fwmark") is not None:
        return f"fwmark {f['fwmark']}"
    if f.get("group") is not None:
        return f"group {f['group']}"
    return _addr_port(f.get("addr"), f.get("port"))


def _addr_port(addr, port) -> str:
    a = addr or "?"
    if ":" in a:
        a = f"[{a}]"
    return f"{a}:{port}" if port else a


def _family(addr: str | None) -> int | None:
    return None if addr is None else (6 if ":" in addr else 4)


# --- root-level handlers for blocks kept as written -----------------------------------------------------


def _need_block(ctx, st, what="block") -> bool:
    if st.children is None:
        ctx.error(st.file, st.line, f"{st.kw}: needs a {{ }} {what}")
        return False
    return True


def _name(ctx, st) -> str:
    if not st.args:
        ctx.warning(st.file, st.line, f"{st.kw}: no name")
        return ""
    return st.args[0]


def _root_global_defs(ctx, b, st):
    if not _need_block(ctx, st):
        return
    for c in st.children:
        if c.children is not None:
            ctx.global_defs[c.kw] = tuple(g.text for g in c.children)
        else:
            ctx.global_defs[c.kw] = " ".join(c.args)


def _root_vrrp_instance(ctx, b, st):
    node = st.node()
    vips = ()
    block = node.find("virtual_ipaddress")
    if block is not None:
        vips = tuple(c.keyword for c in block.children or ())
    name = _name(ctx, st)
    ctx.vrrp_instances[name] = VrrpInstance(
        name=name, file=st.file, line=st.line, state=node.value("state"),
        interface=node.value("interface"), virtual_router_id=node.value("virtual_router_id"),
        priority=node.value("priority"), virtual_ipaddresses=vips, tree=node)


def _root_vrrp_sync_group(ctx, b, st):
    node = st.node()
    grp = node.find("group")
    if grp is not None:
        members = tuple(w for c in grp.children or () for w in (c.keyword,) + c.args)
    else:   # pre-1.3 syntax: the instance names directly in the block
        members = tuple(c.keyword for c in node.children or () if not c.args and c.children is None)
    name = _name(ctx, st)
    ctx.vrrp_sync_groups[name] = VrrpSyncGroup(name, st.file, st.line, members, node)


def _root_vrrp_script(ctx, b, st):
    node = st.node()
    script = node.find("script")
    name = _name(ctx, st)
    ctx.vrrp_scripts[name] = VrrpScript(
        name, st.file, st.line, script=" ".join(script.args) if script else None,
        interval=node.value("interval"), weight=node.value("weight"), tree=node)


def _root_static(ctx, b, st):
    if _need_block(ctx, st):
        ctx.static[st.kw].extend(c.text for c in st.children)


def _root_other(ctx, b, st):
    ctx.other.append(st.node())


def _root_synproxy(ctx, b, st):
    """synproxy { init_mss 1452  sack on  syn_retry 3 ... } (lvs-dp's; DPVS has a block of the
    name): the patched kernel's net.ipv4.vs.synproxy_* sysctls, by lvs-dp field name, sysctl name
    (``synproxy_ack_skb_store_thresh``) or DPVS's flat keyword (``rs_syn_max_retry``); see
    control/synproxy_settings.py. DPVS's two sub-blocks are read too: ``synack_options { mss N
    ttl N sack timestamp wscale N }`` and ``conn_reuse_state { close time_wait ... }`` (the
    states listed are on, the others off). Ranges are SynproxySettings'. keepalived does not
    know the block (it warns and skips it). The settings module is imported only when the block
    is used: it brings numba with it."""
    if not _need_block(ctx, st):
        return
    from control import synproxy_settings as sps
    if st.args:
        ctx.warning(st.file, st.line, f"synproxy: extra '{' '.join(st.args)}' ignored")
    seen: dict[str, int] = {}
    for c in st.children:
        if c.kw == "synack_options" and c.children is not None and not c.toks[0].quoted:
            for o in c.children:
                _synproxy_value(ctx, sps, o, _DPVS_SYNACK_OPTIONS.get(o.kw), seen,
                                "synproxy synack_options")
            continue
        if c.kw == "conn_reuse_state" and c.children is not None and not c.toks[0].quoted:
            _synproxy_reuse_states(ctx, c, seen)
            continue
        _synproxy_value(ctx, sps, c, None if c.toks[0].quoted else sps.field_for(c.kw), seen)


_DPVS_SYNACK_OPTIONS = {"mss": "init_mss", "ttl": "synack_ttl", "sack": "sack",
                        "timestamp": "timestamp", "wscale": "wscale"}
_REUSE_STATES = ("close", "time_wait", "fin_wait", "close_wait", "last_ack")


def _synproxy_value(ctx, sps, c, field_, seen, where="synproxy"):
    """One ``keyword [value]`` of the synproxy block into ctx.synproxy, or its diagnostic."""
    if field_ is None:
        ctx.warning(c.file, c.line, f"{where}: unknown keyword '{c.kw}'")
        return
    if c.children is not None:
        ctx.error(c.file, c.line, f"{where} {c.kw}: takes no {{ }} block")
        return
    if not c.args and field_ not in sps.BOOL_FIELDS:
        ctx.error(c.file, c.line, f"{where} {c.kw}: missing value")
        return
    if len(c.args) > 1:
        ctx.warning(c.file, c.line, f"{where} {c.kw}: extra '{' '.join(c.args[1:])}' ignored")
    try:
        v = sps.read_value(field_, c.args[0]) if c.args else 1
    except ValueError as e:
        ctx.error(c.file, c.line, f"{where} {c.kw}: {e}")
        return
    errs = sps.with_values(sps.SynproxySettings(), {field_: v}).field_errors()
    if errs:
        ctx.error(c.file, c.line, f"{where} {c.kw}: {errs[0][1]}")
        return
    if field_ in seen:
        ctx.warning(c.file, c.line, f"{where} {c.kw}: given again (first at line "
                                    f"{seen[field_]}); the last one is used")
    seen[field_] = c.line
    ctx.synproxy[field_] = v


def _synproxy_reuse_states(ctx, c, seen):
    """DPVS's ``conn_reuse_state { close time_wait }``: reuse on, exactly the states listed."""
    on = set()
    for s in c.children:
        for word in [s.kw] + s.args:
            if word in _REUSE_STATES:
                on.add(word)
            else:
                ctx.error(s.file, s.line, f"synproxy conn_reuse_state: unknown state '{word}' "
                                          f"(expected {', '.join(_REUSE_STATES)})")
    ctx.synproxy["conn_reuse"] = 1
    for state in _REUSE_STATES:
        ctx.synproxy[f"conn_reuse_{state}"] = int(state in on)
        seen[f"conn_reuse_{state}"] = c.line


def _root_vsg(ctx, b, st):
    """virtual_server_group NAME { ADDR|RANGE [PORT] ... fwmark N [inet|inet6] ... }"""
    if not _need_block(ctx, st):
        return
    if not st.args:
        ctx.error(st.file, st.line, "virtual_server_group: missing group name")
        return
    members = []
    for c in st.children:
        if c.children is not None:
            ctx.error(c.file, c.line, f"virtual_server_group: unexpected block after '{c.text}'")
        a = c.args
        if c.kw == "fwmark":
            mark = _int(ctx, c, a[0], 1, _U32_MAX, f"virtual_server_group {st.args[0]} fwmark") \
                if a else None
            if not a:
                ctx.error(c.file, c.line, f"virtual_server_group {st.args[0]} fwmark: missing mark")
            if mark is not None:
                members.append(GroupMember(c.file, c.line, fwmark=mark))
            continue
        try:
            addrs = expand_range(c.kw)
        except ValueError as e:
            ctx.error(c.file, c.line, f"virtual_server_group {st.args[0]}: {e}")
            continue
        port = _port(ctx, c, a[0], what=f"virtual_server_group {st.args[0]}") if a else None
        if a and port is None:
            continue
        if len(a) > 1:
            ctx.warning(c.file, c.line, f"virtual_server_group {st.args[0]}: extra "
                                        f"'{' '.join(a[1:])}' ignored")
        members.append(GroupMember(c.file, c.line, addr=c.kw, port=port, addresses=addrs))
    name = st.args[0]
    if name in ctx.groups:
        ctx.error(st.file, st.line, f"virtual_server_group {name}: already defined at line "
                                    f"{ctx.groups[name].line}")
        return
    if not members:
        ctx.warning(st.file, st.line, f"virtual_server_group {name}: no entries (keepalived "
                                      f"removes the group)")
        return
    ctx.groups[name] = VirtualServerGroup(name, st.file, st.line, tuple(members))


def _root_laddr_group(ctx, b, st):
    """local_address_group NAME { 10.0.0.1  10.0.0.2-10 ... } (Alibaba FULLNAT keepalived). DPVS
    writes an interface after each address (``10.0.0.1 dpdk0``): lvs-dp has no use for it."""
    if not _need_block(ctx, st):
        return
    if not st.args:
        ctx.error(st.file, st.line, "local_address_group: missing group name")
        return
    name = st.args[0]
    addrs: list[str] = []
    for c in st.children:
        if c.children is not None:
            ctx.error(c.file, c.line, f"local_address_group: unexpected block after '{c.text}'")
        prev_addr = False
        for t in c.toks:
            try:
                got = expand_range(t.text)
            except ValueError as e:
                if prev_addr and re.fullmatch(r"[A-Za-z][\w.:-]*", t.text):
                    ctx.warning(c.file, c.line, f"local_address_group {name}: interface "
                                                f"'{t.text}' ignored (lvs-dp picks the route)")
                    prev_addr = False
                    continue
                ctx.error(c.file, c.line, f"local_address_group {name}: {e}")
                prev_addr = False
                continue
            for a in got:
                if a in addrs:
                    ctx.warning(c.file, c.line, f"local_address_group {name}: {a} listed twice")
                else:
                    addrs.append(a)
            prev_addr = True
    if name in ctx.laddr_groups:
        ctx.error(st.file, st.line, f"local_address_group {name}: defined twice")
        return
    if not addrs:
        ctx.error(st.file, st.line, f"local_address_group {name}: no addresses")
        return
    ctx.laddr_groups[name] = tuple(addrs)


def _check_references(ctx: _Ctx) -> None:
    """What can only be checked once every file is read: named groups exist, no service twice."""
    for kind, name, file, line in ctx.refs:
        table = ctx.groups if kind == "virtual_server_group" else ctx.laddr_groups
        if name not in table:
            what = "virtual_server group" if kind == "virtual_server_group" else "laddr_group_name"
            ctx.error(file, line, f"{what} {name}: no {kind} '{name}' is defined")
    seen: dict[tuple, VirtualServer] = {}
    for vs in ctx.services:
        key = ((None, vs.fwmark) if vs.fwmark is not None else ("group", vs.group)
               if vs.group is not None else (vs.protocol, vs.addr, vs.port))
        if key in seen:
            first = seen[key]
            ctx.error(vs.file, vs.line, f"virtual_server {vs.name}: defined twice (first at "
                                        f"{first.file}:{first.line})")
        else:
            seen[key] = vs


# --- the grammar: declared once, read by every parse --------------------------------------------------


def _kw(name, handler=None, min_args=1, max_args=1, **kw) -> tuple[str, _Kw]:
    return name, _Kw(name, handler, min_args, max_args, **kw)


def _aliases(names, handler, min_args=1, max_args=1, **kw) -> list[tuple[str, _Kw]]:
    """Several spellings, one entry: the walker's duplicate check sees them as one keyword."""
    entry = _Kw(names[0], handler, min_args, max_args, **kw)
    return [(n, entry) for n in names]


def _level(name, entries, begin, end) -> _Level:
    return _Level(name, MappingProxyType(dict(entries)), begin, end)


def _flag(name, field_=None):
    return _kw(name, _h_flag(field_ or name), 0, 1)


def _checker_common(connection: bool) -> list:
    """install_checker_common_keywords(): connection options for checkers that open a
    connection, then what every checker has."""
    out = []
    if connection:
        out += [_kw("connect_ip", _h_ip("connect_ip")), _kw("connect_port", _h_port("connect_port")),
                _kw("bindto", _h_ip("bindto")), _kw("bind_port", _h_port("bind_port")),
                _kw("bind_if", _h_str("bind_if")),
                _kw("connect_timeout", _h_timer("connect_timeout", positive=True)),
                _kw("fwmark", _h_int("fwmark", 0, _U32_MAX))]
    out += [_kw("retry", _h_int("retry", 0, _U32_MAX)),
            _kw("delay_before_retry", _h_timer("delay_before_retry")),
            _kw("warmup", _h_timer("warmup")),
            _kw("delay_loop", _h_timer("delay_loop", positive=True)),
            _flag("alpha"), _kw("log_all_failures", _h_extra_bool, 0, 1)]
    return out


def _grammar() -> _Level:
    url = _level("url", [
        _kw("path", _h_str("path")), _kw("digest", _h_digest),
        _kw("status_code", _h_status_code, 1, None), _kw("virtualhost", _h_str("virtualhost")),
        _kw("regex", _h_rest("regex"), 1, None), _flag("regex_no_match"),
        _kw("regex_options", _h_extra, 1, None), _kw("regex_min_offset", _h_extra_int(0, _U32_MAX)),
        _kw("regex_max_offset", _h_extra_int(0, _U32_MAX)), _kw("regex_stack", _h_extra, 2, 2),
        _kw("tls_compliant", _h_extra_bool, 0, 1),
    ], _begin_plain("url"), _end_url)
    host = _level("host", _checker_common(True)[:7], _begin_plain("host"), _end_host)

    http = _checker_common(True) + _aliases(("retry", "nb_get_retry"), _h_int("retry", 0, _U32_MAX)) + [
        _kw("virtualhost", _h_str("virtualhost")),
        _kw("http_protocol", _h_extra_choice(("1.0", "1.0C", "1.1"))),
        _kw("enable_sni", _h_extra_bool, 0, 1), _kw("sni_name", _h_extra),
        _kw("fast_recovery", _h_extra_bool, 0, 1), _kw("tls_compliant", _h_extra_bool, 0, 1),
        _kw("url", None, 0, 0, level=url, repeat=True)]
    checkers = {
        "TCP_CHECK": _checker_common(True),
        "HTTP_GET": http,
        "SSL_GET": http,
        "MISC_CHECK": _checker_common(False) + [
            _kw("misc_path", _h_rest("misc_path"), 1, None),
            _kw("misc_timeout", _h_int("misc_timeout", 1, _U32_MAX)),
            _flag("misc_dynamic"), _kw("user", _h_user, 1, 2)],
        "SMTP_CHECK": _checker_common(True) + [
            _kw("helo_name", _h_rest("helo_name"), 1, None),
            _kw("host", None, 0, 0, level=host, repeat=True)],
        "DNS_CHECK": _checker_common(True) + [
            _kw("type", _h_extra_choice(("A", "NS", "CNAME", "SOA", "MX", "TXT", "AAAA"))),
            _kw("name", _h_extra)],
        "PING_CHECK": _checker_common(True),
        "UDP_CHECK": _checker_common(True) + [
            _kw("payload", _h_extra, 1, None), _kw("require_reply", _h_extra, 0, None),
            _kw("min_reply_length", _h_extra_int(0, 65535)),
            _kw("max_reply_length", _h_extra_int(0, 65535))],
        "BFD_CHECK": [_kw("name", _h_extra), _flag("alpha")],
        "FILE_CHECK": [_kw("track_file", _h_extra), _kw("weight", _h_extra, 1, 2),
                       _kw("dynamic", _h_extra_bool, 0, 1)],
    }
    checker_kws = [
        _kw(kind, None, 0, 0, repeat=True,
            level=_level(kind, entries, _begin_checker, _end_checker))
        for kind, entries in checkers.items()]

    # Settings a real server passes down to its checkers, a virtual server to its real servers.
    inherited = [
        _kw("retry", _h_int("retry", 1, _U32_MAX)),
        _kw("delay_before_retry", _h_timer("delay_before_retry")),
        _kw("warmup", _h_timer("warmup")),
        _kw("connect_timeout", _h_timer("connect_timeout", positive=True)),
        _kw("delay_loop", _h_timer("delay_loop", positive=True)),
        _flag("inhibit_on_failure"),
        _kw("smtp_alert", _h_extra_bool, 0, 1),
        _kw("virtualhost", _h_str("virtualhost")),
        _kw("snmp_name", _h_extra),
    ]
    rs = _level("real_server", inherited + checker_kws + [
        _kw("weight", _h_int("weight", 0, _WEIGHT_MAX)),
        _kw("lvs_method", _h_forwarding, 1, None),
        _kw("uthreshold", _h_int("uthreshold", 0, _U32_MAX)),
        _kw("lthreshold", _h_int("lthreshold", 0, _U32_MAX)),
        _kw("notify_up", _h_rest("notify_up"), 1, None),
        _kw("notify_down", _h_rest("notify_down"), 1, None),
        _flag("alpha"),
    ], _begin_rs, _end_rs)

    vs = _level("virtual_server", inherited + [
        *_aliases(("lb_algo", "lvs_sched"), _h_choice("lb_algo", SCHEDULERS, label="scheduler")),
        *_aliases(("lb_kind", "lvs_method"), _h_forwarding, 1, None),
        *[_kw(flag, _h_lb_flag, 0, 1) for flag in _LB_FLAGS],
        *_aliases(("lb_flags", "lvs_flags"), _h_legacy_lb_flags, 1, None),
        _flag("ops"),
        _kw("persistence_timeout", _h_persistence_timeout, 0, 1),
        _kw("persistence_granularity", _h_persistence_granularity),
        _kw("persistence_engine", _h_extra),
        _kw("protocol", _h_choice("protocol", _PROTOCOLS, fold=str.upper, label="protocol")),
        _kw("ip_family", _h_ip_family),
        _kw("sorry_server", _h_sorry_server, 1, 2),
        _kw("sorry_server_inhibit", _h_sorry_inhibit, 0, 1),
        _kw("sorry_server_lvs_method", _h_extra, 1, None),
        _kw("weight", _h_int("weight", 1, _WEIGHT_MAX)),
        _kw("quorum", _h_quorum),
        _kw("hysteresis", _h_int("hysteresis", 0, _U32_MAX)),
        _flag("alpha"), _flag("omega"), _flag("ha_suspend"),
        _kw("quorum_up", _h_rest("quorum_up"), 1, None),
        _kw("quorum_down", _h_rest("quorum_down"), 1, None),
        # Alibaba FULLNAT/SYNPROXY keepalived, DPVS, lvs-dp
        _flag("syn_proxy"),
        _kw("laddr_group_name", _h_laddr_group_name),
        _kw("proxy_protocol", _h_proxy_protocol),
        _flag("toa"),
        _kw("real_server", None, 1, 2, level=rs, repeat=True),
    ], _begin_vs, _end_vs)

    raw = [
        ("global_defs", _root_global_defs), ("vrrp_instance", _root_vrrp_instance),
        ("vrrp_sync_group", _root_vrrp_sync_group), ("vrrp_script", _root_vrrp_script),
        ("static_ipaddress", _root_static), ("static_routes", _root_static),
        ("static_rules", _root_static), ("virtual_server_group", _root_vsg),
        ("local_address_group", _root_laddr_group),
        ("synproxy", _root_synproxy),
    ] + [(name, _root_other) for name in _OTHER_ROOTS]
    return _level("root", [_kw(n, h, 0, None, raw=True, repeat=True) for n, h in raw] + [
        _kw("virtual_server", None, 1, 3, level=vs, repeat=True)], None, None)


_ROOT = _grammar()   # immutable keyword tables; all parse state is in _Ctx/_Builder
