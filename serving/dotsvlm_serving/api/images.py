"""Loading the bytes behind an `image_url`: `data:` URLs and http(s) fetches with SSRF protection.

An http(s) URL is refused unless every address its host resolves to is a public (globally routable)
address: loopback, private, link-local (cloud metadata at 169.254.169.254), carrier-grade NAT,
multicast, reserved and unspecified ranges are all refused, IPv4-mapped IPv6 included. The fetch then
connects to the address that was checked (the Host header and TLS SNI keep the original name), so a
DNS answer that changes between the check and the connection cannot redirect it. Redirects are
followed by hand, re-checking each hop. `fetch_allow` (CIDRs or host names) opens specific private
targets, e.g. an in-cluster image store. Body size and total time are capped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx

from .errors import ApiError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAX_REDIRECTS = 3


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    timeout_s: float
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_config(cls, *, max_bytes: int, timeout_s: float, fetch_allow: list[str]) -> "FetchPolicy":
        nets, hosts = [], set()
        for entry in fetch_allow:
            try:
                nets.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                hosts.add(entry.strip().lower().rstrip("."))
        return cls(max_bytes=max_bytes, timeout_s=timeout_s, allow_networks=tuple(nets), allow_hosts=frozenset(hosts))


def _bad(msg: str) -> ApiError:
    return ApiError(400, msg, param="messages", code="invalid_image_url")


# ------------------------------------------------------------------------------------------ data: URLs

def _b64_wrapped(payload: str) -> bytes:
    """Base64 broken into lines (the `base64` tool's default, some clients' too): the same without the
    whitespace; anything else that is not base64 is the client's error."""
    joined = "".join(payload.split())
    try:
        if joined == payload.strip():
            raise ValueError
        return base64.b64decode(joined, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("data: URL payload is not valid base64 (only A-Z, a-z, 0-9, +, / and = padding)") from None


def _b64_chars(payload: str) -> int:
    """The payload's length without the whitespace that wraps it (what decodes to data)."""
    return len(payload) - sum(payload.count(c) for c in " \t\r\n\f\v")


def decode_data_url(url: str, *, max_bytes: int) -> bytes:
    """`data:image/png;base64,....` -> bytes, refusing non-image media types and oversize payloads
    before decoding them."""
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise _bad("malformed data: URL: expected data:<media type>;base64,<data>")
    params = [p.strip().lower() for p in head.split(";")]
    media = params[0] or "text/plain"
    if not media.startswith("image/"):
        raise _bad(f"data: URL has media type {media!r}; only image/* is accepted")
    if "base64" in params[1:]:
        # Line breaks are no data: base64 wrapped at 76 characters is 1.3% longer, and an image just under the
        # limit was refused as over it.
        if len(payload) * 3 // 4 > max_bytes + 3 and _b64_chars(payload) * 3 // 4 > max_bytes + 3:
            raise ApiError(413, f"image is larger than the {max_bytes}-byte limit", param="messages",
                           code="image_too_large")
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            data = _b64_wrapped(payload)
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ApiError(413, f"image is {len(data)} bytes, more than the {max_bytes}-byte limit", param="messages",
                       code="image_too_large")
    if not data:
        raise _bad("data: URL holds no image data")
    return data


# ------------------------------------------------------------------------------------------ addresses

def _unwrap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def is_public_address(ip: IPAddress) -> bool:
    """Globally routable and not special-purpose (is_global already excludes private, loopback,
    link-local, CGNAT 100.64/10, documentation and reserved ranges)."""
    ip = _unwrap(ip)
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_reserved)


def check_address(host: str, ip: IPAddress, policy: FetchPolicy) -> None:
    if host.lower().rstrip(".") in policy.allow_hosts:
        return
    if any(_unwrap(ip) in net or ip in net for net in policy.allow_networks):
        return
    if not is_public_address(ip):
        raise ApiError(400, f"image URL host {host!r} resolves to {ip}, a non-public address (loopback, private, "
                            f"link-local or metadata); such URLs are refused. Send the image as a data: URL, or ask "
                            f"the operator to add the host to api.images.fetch_allow", param="messages",
                       code="image_url_forbidden")


async def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _bad(f"image URL host {host!r} could not be resolved: {exc}") from None
    out: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if ip not in out:
            out.append(ip)
    if not out:
        raise _bad(f"image URL host {host!r} has no addresses")
    return out


# ------------------------------------------------------------------------------------------ fetching

async def fetch_image(url: str, policy: FetchPolicy, *, client: httpx.AsyncClient | None = None) -> bytes:
    """GET an http(s) image URL within the policy's size and time limits."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            own = client is None
            client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
            try:
                for _ in range(_MAX_REDIRECTS + 1):
                    result = await _fetch_once(client, url, policy)
                    if isinstance(result, bytes):
                        return result
                    url = result
                raise _bad(f"image URL redirected more than {_MAX_REDIRECTS} times")
            finally:
                if own:
                    await client.aclose()
    except TimeoutError:
        raise ApiError(400, f"fetching the image URL took longer than {policy.timeout_s:g} s", param="messages",
                       code="image_fetch_timeout") from None


def _ascii_hostport(hostport: str) -> str:
    """An internationalised host name ("例え.jp[:port]") as it goes in the Host header and TLS SNI: its IDNA form
    ("xn--r8jz45g.jp"), the encoding the resolver looked it up in. As it was, the header could not be encoded
    and the request failed with a 500. (IPv6 literals, the only hosts with several colons, are ASCII.)"""
    if hostport.isascii():
        return hostport
    name, colon, port = hostport.partition(":")
    try:
        return name.encode("idna").decode("ascii") + colon + port
    except UnicodeError as exc:
        raise _bad(f"image URL host {name!r} is not a valid host name: {exc}") from None


async def _fetch_once(client: httpx.AsyncClient, url: str, policy: FetchPolicy) -> bytes | str:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket: "http://[::1/x"
        raise _bad(f"image URL is malformed ({exc}): {url[:200]!r}") from None
    if parts.scheme not in ("http", "https"):
        raise _bad(f"image URL scheme {parts.scheme!r} is not supported; use http(s) or a data: URL")
    host = parts.hostname
    if not host:
        raise _bad("image URL has no host")
    if parts.username or parts.password:
        raise _bad("image URLs with credentials are refused")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _bad("image URL has an invalid port") from None
    addrs = await resolve(host, port)
    for ip in addrs:
        check_address(host, ip, policy)
    hostport = _ascii_hostport(parts.netloc.rsplit("@", 1)[-1])
    headers = {"Host": hostport, "Accept": "image/*"}
    extensions = {"sni_hostname": _ascii_hostport(host)} if parts.scheme == "https" else {}
    # Each checked address in turn until one connects, as browsers and curl do: a host that resolves to an
    # IPv6 address first fails at once in a pod without an IPv6 route, and its IPv4 address serves.
    refused: list[str] = []
    for ip in addrs:
        netloc = f"[{ip}]" if ip.version == 6 else str(ip)
        pinned = parts._replace(netloc=f"{netloc}:{port}").geturl()
        try:
            return await _get(client, url, pinned, headers, extensions, policy)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            refused.append(f"{ip} ({type(exc).__name__}: {exc})")
    raise _bad(f"fetching the image URL failed: could not connect to {host!r} at any of its addresses: "
               f"{'; '.join(refused)}")


async def _get(client: httpx.AsyncClient, url: str, pinned: str, headers: dict[str, str], extensions: dict[str, str],
               policy: FetchPolicy) -> bytes | str:
    """One GET of the pinned address: the image's bytes, or the URL a redirect names. Connection failures
    are raised as they are (the caller tries the host's next address)."""
    try:
        async with client.stream("GET", pinned, headers=headers, extensions=extensions) as resp:
            if resp.is_redirect:
                loc = resp.headers.get("location")
                if not loc:
                    raise _bad("image URL redirected without a Location")
                return urljoin(url, loc)
            if resp.status_code != 200:
                raise _bad(f"fetching the image URL returned HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise ApiError(413, f"image at URL is {declared} bytes, more than the {policy.max_bytes}-byte limit",
                               param="messages", code="image_too_large")
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                if len(buf) > policy.max_bytes:
                    raise ApiError(413, f"image at URL is more than the {policy.max_bytes}-byte limit",
                                   param="messages", code="image_too_large")
            return bytes(buf)
    except (httpx.ConnectError, httpx.ConnectTimeout):
        raise
    except httpx.InvalidURL as exc:
        # What httpx refuses to send (a control character, a URL over 64 KiB) is the client's error too: InvalidURL
        # is no HTTPError, and it came out as a 500. (The host is checked by the resolver, as before: httpx's
        # stricter IDNA would refuse names that resolve, such as ☃.net.)
        raise _bad(f"image URL is malformed ({exc}): {url[:200]!r}") from None
    except httpx.HTTPError as exc:
        raise _bad(f"fetching the image URL failed: {type(exc).__name__}: {exc}") from None


async def load_image_bytes(url: str, policy: FetchPolicy) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, max_bytes=policy.max_bytes)
    if scheme in ("http", "https"):
        return await fetch_image(url, policy)
    raise _bad(f"image URL scheme {scheme or '(none)'!r} is not supported; use a data: URL or http(s)")
