// Live data over WebSocket (graphql-ws, `graphql-transport-ws`).
//
// Catching up after a dropped connection: while the socket is down every live value is
// marked stale (shown greyed, "as of" the last update), never as current. When it is back,
// each subscription's snapshot is re-queried over HTTP first, then the subscription is
// started again, and every start is followed by one more re-query to cover changes
// committed in between (a snapshot is dropped when an event arrived while it was read).
import { gql, signOut, token } from './api.js';
import { ApiError } from './errors.js';

const state = { status: 'connecting', since: null, lastLive: null };
const statusListeners = new Set();
const subscriptions = new Set();
let client = null;
let everConnected = false;

function setStatus(status) {
  if (state.status === 'live' && status !== 'live') state.lastLive = new Date();
  state.status = status;
  state.since = new Date();
  for (const listener of statusListeners) listener({ ...state });
}

export function liveStatus() {
  return { ...state };
}

export function onLiveStatus(listener) {
  statusListeners.add(listener);
  return () => statusListeners.delete(listener);
}

function wsUrl() {
  const scheme = window.location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${window.location.host}/graphql`;
}

function start(sub) {
  sub.events = 0;
  sub.dispose = client.subscribe(
    { query: sub.query, variables: sub.variables },
    {
      next: (message) => {
        if (message.errors?.length) {
          const e = message.errors[0];
          sub.onError?.(new ApiError(e.extensions?.code ?? 'INTERNAL', e.message, e.extensions ?? {}));
          return;
        }
        sub.events += 1;
        sub.onData(message.data);
      },
      error: (e) => {
        if (Array.isArray(e) && e[0]) sub.onError?.(new ApiError(e[0].extensions?.code ?? 'INTERNAL', e[0].message));
      },
      complete: () => {},
    },
  );
  // Covers what was committed between the last snapshot and the subscription's start.
  setTimeout(() => subscriptions.has(sub) && refresh(sub), 250);
}

async function refresh(sub) {
  if (!sub.refresh) return;
  const seen = sub.events;
  try {
    await sub.refresh(() => sub.events === seen);
  } catch (e) {
    sub.onError?.(e);
  }
}

async function catchUp() {
  setStatus('catching-up');
  const all = [...subscriptions];
  await Promise.all(all.map(refresh));
  for (const sub of subscriptions) if (!sub.dispose) start(sub);
  setStatus('live');
}

function onClosed(event) {
  for (const sub of subscriptions) {
    sub.dispose?.();
    sub.dispose = null;
  }
  if (token()) setStatus('offline');
  // A refused token closes the socket with code 1002 (or 4403) before the ack: confirm over
  // HTTP, where UNAUTHENTICATED signs out with its message.
  if (event?.code === 1002 || event?.code === 4403 || event?.code === 4401) {
    gql('{ viewer { user { id } } }').catch(() => {});
  }
}

export function connect() {
  if (client) return;
  client = window.graphqlWs.createClient({
    url: wsUrl(),
    lazy: false,
    keepAlive: 10_000,
    retryAttempts: Infinity,
    shouldRetry: () => Boolean(token()),
    retryWait: (retries) => new Promise((r) => setTimeout(r, Math.min(250 * 2 ** retries, 4000))),
    connectionParams: () => ({ authorization: `Bearer ${token()}` }),
    on: {
      connected: () => {
        if (everConnected) {
          catchUp();
        } else {
          everConnected = true;
          for (const sub of subscriptions) if (!sub.dispose) start(sub);
          setStatus('live');
        }
      },
      closed: onClosed,
    },
  });
}

export function disconnect() {
  client?.dispose();
  client = null;
  everConnected = false;
  subscriptions.clear();
  setStatus('connecting');
}

/**
 * Subscribes while the caller lives. `refresh(stillCurrent)` re-reads the snapshot after a
 * reconnect; it should apply its result only when `stillCurrent()` is true.
 * Returns the unsubscribe function.
 */
export function subscribe({ query, variables, onData, onError, refresh: reload }) {
  const sub = { query, variables, onData, onError, refresh: reload, dispose: null, events: 0 };
  subscriptions.add(sub);
  if (client && state.status === 'live') start(sub);
  return () => {
    subscriptions.delete(sub);
    sub.dispose?.();
  };
}

/** Test hook: closes the socket as a network drop would (the client reconnects). */
window.__reservoirDropSocket = () => client?.terminate?.();
