"""Fetching an image URL an API client chose, without letting that client reach what only the server can reach (SSRF).

A client who can make the server fetch a URL could otherwise read the cloud's metadata service (169.254.169.254,
which hands out credentials), the server's own loopback services and the private network behind it. So every hop is
checked before it is connected to: http(s) only, the host resolved here and every address it resolves to public (or
inside a network the operator allowed), and the connection made to the very address that was checked. That last
part defeats DNS rebinding (a name that answers a public address to the check and 127.0.0.1 to the connect). The
Host header and, for https, the TLS server name (SNI and the certificate's check) stay the URL's own name.
Redirects are followed by hand, at most MAX_REDIRECTS, each hop checked as the first one was."""

import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import httpx

MAX_REDIRECTS = 3
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]  # host, port -> every address it resolves to
EVERY_NETWORK = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
# getaddrinfo has no timeout of its own: a name whose name server never answers held a request for as long as the
# system resolver tried (resolv.conf's timeouts x attempts x servers, 10 s and more), past the fetch's deadline. Names
# are resolved on these threads, waited for until the deadline; a lookup left running holds one of them, not a
# request, and at most this many at once (more wait, and time out with their request).
_RESOLVERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="llava-resolve")


class MediaError(ValueError):
    """An image URL that is refused; `status` is the HTTP status to answer with (400, or 413 when too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_networks(values: list[str]) -> tuple[Network, ...]:
    """`--allow-private-image-urls` values ("10.0.0.0/8", "192.168.1.7"); none at all: every network."""
    if not values:
        return EVERY_NETWORK
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)  # ValueError names the bad one


def is_public(address: Address) -> bool:
    """A unicast address on the public internet. An IPv4 address written as IPv6 (::ffff:127.0.0.1) is judged as
    the IPv4 address it is; 6to4 and Teredo addresses also by the IPv4 addresses they carry."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        carried = [address.sixtofour, *(address.teredo or ())]
        if not all(is_public(inner) for inner in carried if inner is not None):
            return False
        if address.is_site_local:  # fec0::/10, deprecated but still routed inside some networks: "global" to Python
            return False
    # is_global alone would let multicast through: 224.0.0.0/4 is "global" to Python 3.11
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified
                                       or address.is_link_local or address.is_loopback or address.is_private)


def allowed(address: Address, private_networks: tuple[Network, ...]) -> bool:
    if address.is_multicast or address.is_unspecified:  # never a server to fetch from (0.0.0.0 reaches loopback)
        return False
    if is_public(address):
        return True
    plain = (address.ipv4_mapped or address) if isinstance(address, ipaddress.IPv6Address) else address
    return any(plain.version == network.version and plain in network for network in private_networks)


def system_resolve(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)]


def checked_address(url: httpx.URL, private_networks: tuple[Network, ...], resolve: Resolver, deadline: float | None = None,
                    timeout: float = 0.0) -> str:
    """The address to connect to for `url`. Every address its host resolves to must be allowed: a name with one
    public and one private address is refused, since which one gets used is not the check's to know. With a
    `deadline` (time.monotonic()), a lookup still running then fails the fetch as too slow (`timeout` its seconds)."""
    if url.scheme not in ("http", "https"):
        raise MediaError(f"only http and https image URLs are fetched, not {url.scheme or 'a relative URL'}")
    host = url.raw_host.decode("ascii")
    if not host:
        raise MediaError("an image URL needs a host")
    port = url.port or (443 if url.scheme == "https" else 80)
    lookup = _RESOLVERS.submit(resolve, host, port)
    try:
        addresses = [ipaddress.ip_address(found) for found in lookup.result(
            timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))]
    except FutureTimeout:
        lookup.cancel()  # if it has not started; else it ends on its resolver's own time, on its thread
        raise MediaError(f"resolving the image URL's host {host} took more than the fetch's {timeout:g} s") from None
    except (OSError, UnicodeError, ValueError):
        addresses = []
    if not addresses:
        raise MediaError(f"the host {host} of the image URL cannot be resolved")
    if not all(allowed(address, private_networks) for address in addresses):
        # which address is not said: that would map the server's private network for the client
        raise MediaError(f"the image URL's host {host} is not a public address: this server never fetches from "
                         "loopback, private, link-local, shared, multicast or reserved addresses")
    return str(addresses[0])


def fetch(url: str, max_bytes: int, timeout: float, private_networks: tuple[Network, ...] = (),
          resolve: Resolver = system_resolve, verify: ssl.SSLContext | bool = True) -> bytes:
    """The body of `url`, each hop checked and connected to at its checked address, in `timeout` seconds for all
    hops and at most `max_bytes`; MediaError otherwise. `verify`: httpx's (an SSLContext for an in-house CA)."""
    deadline = time.monotonic() + timeout
    try:
        target = httpx.URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            address = checked_address(target, private_networks, resolve, deadline, timeout)
            got = _get(target, address, max_bytes, deadline, timeout, verify)
            if isinstance(got, bytes):
                return got
            target = target.join(got)  # a redirect: relative to where it came from
    except httpx.InvalidURL as error:
        raise MediaError(f"the image URL is malformed: {error}") from None
    except httpx.HTTPError as error:
        raise MediaError(f"could not fetch the image {url}: {type(error).__name__}") from error
    raise MediaError(f"the image URL {url} redirects more than {MAX_REDIRECTS} times")


def _get(url: httpx.URL, address: str, max_bytes: int, deadline: float, timeout: float,
         verify: ssl.SSLContext | bool) -> bytes | str:
    """One hop: the body, or where a redirect points."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _too_slow(url, timeout)
    watchdog = _Watchdog(left)
    # the URL's name for TLS (SNI, and the certificate is checked against it), its address for the connection
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    try:
        # trust_env=False: neither a proxy nor ~/.netrc credentials from the operator's environment
        with httpx.Client(timeout=left, verify=verify, trust_env=False, follow_redirects=False) as client:
            # identity: no gzip, whose few kilobytes inflate to gigabytes in one read, before a size check sees them
            request = client.build_request("GET", url.copy_with(host=address), extensions={**extensions, "trace": watchdog.trace},
                                           headers={"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"})
            return _answer(client.send(request, stream=True), url, max_bytes)
    except httpx.HTTPError:
        if watchdog.expired:  # the watchdog's shutdown is what failed the read
            raise _too_slow(url, timeout) from None
        raise
    finally:
        watchdog.stop()


def _answer(response: httpx.Response, url: httpx.URL, max_bytes: int) -> bytes | str:
    try:
        if response.is_redirect:
            return response.headers["location"]
        response.raise_for_status()
        encoding = response.headers.get("content-encoding", "identity")
        if encoding.lower() != "identity":
            raise MediaError(f"the image {url} came {encoding}-encoded; only plain bodies are read")
        return _body(response, max_bytes)
    finally:
        response.close()


def _too_slow(url: httpx.URL, timeout: float) -> MediaError:
    return MediaError(f"fetching the image {url} took more than {timeout:g} s")


class _Watchdog:
    """Shuts a hop's connection down when the fetch's time is up. httpx's timeout is per read: a server that sends
    its headers or body a byte at a time, each byte within it, would otherwise hold the fetch (a worker thread and
    the request's place) for hours. A shutdown makes the read blocked on the socket return at once."""

    def __init__(self, seconds: float):
        self.expired, self._connections, self._lock = False, [], threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: dict):
        """httpx's trace extension: each connection once it is connected, kept as a duplicate of its descriptor.
        That stays this connection after httpx closes its own descriptor (whose number another socket may get
        next), and after TLS detaches the socket object it wraps."""
        if event == "connection.connect_tcp.complete":
            duplicate = socket.socket(fileno=os.dup(info["return_value"].get_extra_info("socket").fileno()))
            with self._lock:
                self._connections.append(duplicate)
                if self.expired:
                    _shutdown(duplicate)

    def _expire(self):
        with self._lock:
            self.expired = True
            for connection in self._connections:
                _shutdown(connection)

    def stop(self):
        self._timer.cancel()
        with self._lock:
            for connection in self._connections:
                connection.close()  # the connection itself closes with httpx's descriptor and this one
            self._connections = []


def _shutdown(connection: socket.socket):
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed by its server already
        pass


def _body(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"the image is {int(declared):,} bytes; the limit is {max_bytes:,}", status=413)
    data = bytearray()
    for chunk in response.iter_raw():  # as slow as the server likes: the watchdog bounds the time
        data += chunk
        if len(data) > max_bytes:
            raise MediaError(f"the image is over the limit of {max_bytes:,} bytes", status=413)
    return bytes(data)
