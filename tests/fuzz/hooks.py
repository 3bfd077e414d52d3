"""Schemathesis hooks for the fuzz test (tests/tests/e2e/fuzz.rs).

The test runs one worker, for gateway $FUZZ_GATEWAY of region $FUZZ_REGION. A `POST /sessions`
naming any other gateway or region the api accepts creates a session that no worker serves,
and every command on it then answers 503 `gateway_unavailable`, as documented (the session
waits for its gateway, or for a move to a live one of its region). That 503 is the contract,
not a server fault, and the `commands` tests prove it; here it would hide the 500s the run is
for. So a well-formed gatewayId or region is pointed at the live one before the request
leaves; a malformed one is sent as generated, so that rejection is still fuzzed. Every other
request, and every check, is untouched.
"""

import os
import re

import schemathesis

# What the api accepts as a gateway id or a region (shared::session::validate_gateway_id).
WELL_FORMED = re.compile(r"[a-z0-9-]{1,64}")


@schemathesis.hook
def before_call(context, case, kwargs):
    operation = context.operation
    if operation is None or operation.method.upper() != "POST" or operation.path != "/api/v1/sessions":
        return
    if not isinstance(case.body, dict):
        return
    for field, live in (("gatewayId", "FUZZ_GATEWAY"), ("region", "FUZZ_REGION")):
        value = case.body.get(field)
        if isinstance(value, str) and WELL_FORMED.fullmatch(value):
            case.body[field] = os.environ[live]


# What only `manage` may see among the reads: a session's QR code, and the webhooks (their
# URLs, delivery logs and secrets). Paths as the OpenAPI document names them.
MANAGE_ONLY_READS = re.compile(r"^/api/v1/(sessions/\{session\}/qr|webhooks.*)$")


@schemathesis.check
def read_only_sees_no_manage_data(ctx, response, case):
    """With a read-only key ($FUZZ_READ_ONLY set): no change is accepted, no manage-only read
    answers 2xx, and no body carries a QR or pairing code or a webhook secret."""
    if not os.environ.get("FUZZ_READ_ONLY"):
        return None
    method = case.operation.method.upper()
    path = case.operation.path
    status = response.status_code
    if 200 <= status < 300 and (method != "GET" or MANAGE_ONLY_READS.match(path)):
        raise AssertionError(f"a read-only key was answered {status} by {method} {path}")
    text = response.text or ""
    # `"qr":` is a QR code's field; the word alone is also a command's kind (`"kind":"qr"`
    # in a session's command list, which carries no code).
    for leak in ('"qr":', '"secret"', "auth.qr", "auth.pair_code", "whsec_"):
        if 200 <= status < 300 and leak in text:
            raise AssertionError(f"{method} {path} showed a read-only key {leak}")
    return None
