"""The little XML the S3 protocol needs (built as strings: fast and exact), error documents included."""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET
import xml.parsers.expat as expat
from typing import Any, NoReturn
from xml.sax.saxutils import escape as _escape

# S3Error is imported from here by code outside the object store too
from hackboot.objectstore.s3errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n'
MAX_XML_BODY = 1024 * 1024

_SPECIAL = re.compile('[&<>"\r\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]')
# characters XML 1.0 cannot carry at all, even as references (stored keys never hold them; a request's
# prefix, marker or key echoed back in a listing or an error document may)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def esc(value: Any) -> str:
    text = str(value)
    if _SPECIAL.search(text) is None:  # the common case: nothing to escape
        return text
    # a carriage return as a reference: a literal one would reach the client as a line feed
    return _NOT_XML.sub("\ufffd", _escape(text, {'"': "&quot;", "\r": "&#13;"}))


def iso(ts: dt.datetime) -> str:
    if ts.utcoffset() != dt.timedelta(0):
        ts = ts.astimezone(dt.UTC)
    return ts.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def http_date(ts: dt.datetime) -> str:
    return ts.astimezone(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def tag(name: str, value: Any) -> str:
    return f"<{name}>{esc(value)}</{name}>"


def doc(root: str, inner: str) -> bytes:
    return f'{HEADER}<{root} xmlns="{NS}">{inner}</{root}>'.encode()


def error_document(err: S3Error, resource: str, request_id: str) -> bytes:
    extra = "".join(f"<{k}>{esc(v)}</{k}>" for k, v in err.extra.items())
    return (f"{HEADER}<Error><Code>{err.code}</Code><Message>{esc(err.message)}</Message>{extra}"
            f"<Resource>{esc(resource)}</Resource><RequestId>{request_id}</RequestId>"
            f"<HostId>{request_id}</HostId></Error>").encode()


# --- parsing -------------------------------------------------------------------------------------

class Node:
    """A namespace-free view of an XML element: `node.find("Rule")`, `node.text_of("ID")`."""

    def __init__(self, el: ET.Element) -> None:
        self.el = el
        self.tag = el.tag.rsplit("}", 1)[-1]

    @property
    def text(self) -> str:
        return (self.el.text or "").strip()

    def children(self, name: str | None = None) -> list[Node]:
        out = [Node(c) for c in self.el]
        return [c for c in out if name is None or c.tag == name]

    def find(self, name: str) -> Node | None:
        for c in self.el:
            if c.tag.rsplit("}", 1)[-1] == name:
                return Node(c)
        return None

    def text_of(self, name: str, default: str | None = None) -> str | None:
        n = self.find(name)
        return n.el.text if n is not None and n.el.text is not None else (default if n is None else "")


class _Refused(Exception):
    pass


def _refuse(*_: Any) -> NoReturn:
    raise _Refused


def _qname(name: str) -> str:
    # expat reports "namespace}local" with namespace_separator="}"; ElementTree spells it "{namespace}local"
    return "{" + name if "}" in name else name


def safe_fromstring(body: bytes) -> ET.Element:
    """Parse XML with expat directly, refusing any DOCTYPE (hence any entity declaration or external
    reference) whatever the document's encoding: a byte search for "<!DOCTYPE" misses UTF-16."""
    builder = ET.TreeBuilder()
    p = expat.ParserCreate(namespace_separator="}")
    p.buffer_text = True
    p.StartDoctypeDeclHandler = _refuse
    p.EntityDeclHandler = _refuse
    p.UnparsedEntityDeclHandler = _refuse
    p.NotationDeclHandler = _refuse
    p.ExternalEntityRefHandler = _refuse
    p.SkippedEntityHandler = _refuse
    p.StartElementHandler = lambda name, attrs: builder.start(_qname(name), {_qname(k): v for k, v in attrs.items()})
    p.EndElementHandler = lambda name: builder.end(_qname(name))
    p.CharacterDataHandler = builder.data
    p.Parse(body, True)
    return builder.close()


def parse(body: bytes, root: str | None = None) -> Node:
    if len(body) > MAX_XML_BODY:
        raise S3Error("MaxMessageLengthExceeded", "Your request was too big")
    if not body.strip():
        raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate "
                                      "against our published schema")
    try:
        el = safe_fromstring(body)
    except _Refused:
        raise S3Error("MalformedXML", "DTDs and entity declarations are not allowed") from None
    except (expat.ExpatError, ValueError, UnicodeError):
        raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate "
                                      "against our published schema") from None
    node = Node(el)
    if root is not None and node.tag != root:
        raise S3Error("MalformedXML", f"Expected a <{root}> document, got <{node.tag}>")
    return node
