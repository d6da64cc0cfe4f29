"""schemathesis hooks for tests/openapi/run.sh (loaded through SCHEMATHESIS_HOOKS).

After a `101 Switching Protocols` the connection speaks WebSocket, but `requests` hands it
back to its pool like any other, and the next generated request would be written into
the WebSocket (where herald rightly closes it with 1002). Closing the socket once the 101
is in makes the pool open a fresh connection for the next request.
"""

import requests.adapters

_send = requests.adapters.HTTPAdapter.send


def _send_closing_upgrades(self, request, **kwargs):
    response = _send(self, request, **kwargs)
    connection = getattr(response.raw, "_connection", None)
    if response.status_code == 101 and connection is not None:
        connection.close()
    return response


requests.adapters.HTTPAdapter.send = _send_closing_upgrades
