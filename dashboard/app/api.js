// The public GraphQL API over HTTP, and the session (the token lives in this tab's
// sessionStorage only: it is never put in a URL the server sees, nor in localStorage).
import { ApiError } from './errors.js';

const TOKEN_KEY = 'reservoir.token';
const signOutListeners = new Set();

export function takeTokenFromLocation() {
  const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    // Drop the token from the address bar and the history entry.
    history.replaceState(null, '', window.location.pathname + '#/');
  }
}

export const token = () => sessionStorage.getItem(TOKEN_KEY);

export function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value.trim());
}

/** Forgets the token; `reason` (an ApiError or null) is shown on the sign-in screen. */
export function signOut(reason = null) {
  sessionStorage.removeItem(TOKEN_KEY);
  for (const listener of signOutListeners) listener(reason);
}

export function onSignOut(listener) {
  signOutListeners.add(listener);
  return () => signOutListeners.delete(listener);
}

/** Runs a query or mutation; throws ApiError (an expired token also signs out). */
export async function gql(query, variables = {}) {
  let response;
  try {
    response = await fetch('/graphql', {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token()}` },
      body: JSON.stringify({ query, variables }),
    });
  } catch (e) {
    throw new ApiError('NETWORK', String(e));
  }
  let body;
  try {
    body = await response.json();
  } catch {
    throw new ApiError(response.status === 413 ? 'LIMIT_EXCEEDED' : 'INTERNAL', `HTTP ${response.status}`);
  }
  const first = body.errors?.[0];
  if (first) {
    const error = new ApiError(first.extensions?.code ?? 'INTERNAL', first.message, first.extensions ?? {});
    if (error.code === 'UNAUTHENTICATED') signOut(error);
    throw error;
  }
  return body.data;
}

/** A fresh idempotency key for one money action. */
export const idempotencyKey = (what) => `dash-${what}-${crypto.randomUUID()}`;
