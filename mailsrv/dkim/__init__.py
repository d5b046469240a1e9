"""DKIM signing of the mail that leaves through the relay (RFC 6376, RFC 8463).

* :mod:`~mailsrv.dkim.names`: what a signing domain and a selector may be;
* :mod:`~mailsrv.dkim.keys`: the key directory (``<data_dir>/dkim/<domain>/``), key generation,
  activation and the :class:`~mailsrv.dkim.keys.KeyRing` the server signs with;
* :mod:`~mailsrv.dkim.record`: the DNS TXT record of a key, to publish and to compare;
* :mod:`~mailsrv.dkim.signing`: which key signs a message and the signing itself (dkimpy);
* :mod:`~mailsrv.dkim.signer`: the commit step that signs queued messages once, off the reactor;
* :mod:`~mailsrv.dkim.check`: whether the published record matches a key (``mailsrv dkim check``).
"""
