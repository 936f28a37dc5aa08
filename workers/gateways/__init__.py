"""The ingress gateways: the HTTP service (http/) and the SMTP/LMTP gateway."""
