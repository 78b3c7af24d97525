"""Runs localstripe (a stateful Stripe fake, PyPI `localstripe`) for Reservoir's tests.

Started by `reservoir_tests::localstripe::LocalStripe::start()` as
`python3 localstripe_shim.py --port N --from-scratch`. Three changes at the fake's edge,
each where localstripe differs from Stripe in a way Reservoir's requests would hit:

1. Storage: localstripe pickles its whole store to /tmp/localstripe.pickle after every
   write; every test runs its own process, so that file is not shared (nor written).
2. `description` on a PaymentIntent: Stripe accepts it, localstripe answers 400
   "Unexpected description". It is kept on the object, as Stripe does.
3. `Idempotency-Key`: localstripe ignores it. Stripe saves the first answer to a key
   and replays it to every repeat with the same parameters (another body with the same
   key is a 400 `idempotency_error`; a repeat while the first is still running is a 409).
   Reservoir relies on that for Customers and charges, so the tests need it.

Everything else (customers, payment methods from test card numbers, attach/detach,
setup intents, payment intents, declines, 3-D Secure, signed webhooks) is localstripe's
own behaviour.
"""

from aiohttp import web

import localstripe.resources as resources
import localstripe.server as server

resources.Store.dump_to_disk = lambda self: None
resources.Store.try_load_from_disk = lambda self: None

_payment_intent_init = resources.PaymentIntent.__init__


def _payment_intent_init_with_description(self, description=None, **kwargs):
    _payment_intent_init(self, **kwargs)
    self.description = description


resources.PaymentIntent.__init__ = _payment_intent_init_with_description

_saved = {}
_in_flight = set()


@web.middleware
async def idempotency(request, handler):
    key = request.headers.get('Idempotency-Key')
    if request.method != 'POST' or not key:
        return await handler(request)
    body = await request.read()
    slot = (request.headers.get('Authorization', ''), key)
    if slot in _saved:
        path, sent, status, payload = _saved[slot]
        if path != request.path or sent != body:
            return web.json_response({'error': {
                'type': 'idempotency_error',
                'message': 'Keys for idempotent requests can only be used with '
                           'the same parameters they were first used with.'}},
                status=400)
        return web.Response(body=payload, status=status,
                            content_type='application/json')
    if slot in _in_flight:
        return web.json_response({'error': {
            'type': 'idempotency_error',
            'message': 'There is currently another in-progress request using '
                       'this Stripe-Idempotency-Key.'}},
            status=409)
    _in_flight.add(slot)
    try:
        response = await handler(request)
    finally:
        _in_flight.discard(slot)
    _saved[slot] = (request.path, body, response.status, response.body)
    return response


server.app.middlewares.insert(0, idempotency)

if __name__ == '__main__':
    server.start()
