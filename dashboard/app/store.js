// Balances of workspaces and totals of accounts as last known, shared by every view, fed
// by queries (snapshots) and by the balanceChanged / accountBalanceChanged subscriptions.
import { useEffect, useState } from 'preact/hooks';
import { subscribe } from './live.js';
import { gql } from './api.js';

const balances = new Map(); // workspace id -> { balance, reserved, available, at, sequence }
const totals = new Map(); // account id -> totalBalance
const listeners = new Set();
const watchers = new Map(); // workspace id -> mounted live views of it

function watch(id) {
  watchers.set(id, (watchers.get(id) ?? 0) + 1);
}

/** A balance nobody keeps live is forgotten, so it is never shown later as current. */
function unwatch(id) {
  const n = (watchers.get(id) ?? 1) - 1;
  if (n > 0) {
    watchers.set(id, n);
  } else {
    watchers.delete(id);
    balances.delete(id);
  }
}

function notify() {
  for (const listener of listeners) listener();
}

/** A snapshot from a query; never overrides a newer live event. */
export function setBalance(id, { balance, reserved, available }, at = new Date()) {
  const known = balances.get(id);
  if (known && known.at > at) return;
  balances.set(id, { balance, reserved, available, at, sequence: known?.sequence ?? 0 });
  notify();
}

export function setTotal(accountId, totalBalance) {
  totals.set(accountId, totalBalance);
  notify();
}

function applyChange(change) {
  const id = change.workspace.id;
  const known = balances.get(id);
  if (known && known.sequence >= change.sequence) return; // already applied
  balances.set(id, {
    balance: change.balance,
    reserved: change.reserved,
    available: change.available,
    at: new Date(change.at),
    sequence: change.sequence,
  });
  notify();
}

/** Re-renders the caller whenever a balance or total changes. */
export function useBalances() {
  const [, setTick] = useState(0);
  useEffect(() => {
    const listener = () => setTick((n) => n + 1);
    listeners.add(listener);
    listener(); // a change between the first render and this effect
    return () => listeners.delete(listener);
  }, []);
  return { balance: (id) => balances.get(id), total: (id) => totals.get(id) };
}

const BALANCE_SUB = `subscription Balance($id: ID!) {
  balanceChanged(workspaceId: $id) { workspace { id } balance reserved available sequence at }
}`;
const ACCOUNT_SUB = `subscription Account($id: ID!) {
  accountBalanceChanged(accountId: $id) { totalBalance change { workspace { id } balance reserved available sequence at } }
}`;
const BALANCE_Q = `query Balance($id: ID!) { workspace(id: $id) { id balance reserved available } }`;
const TOTAL_Q = `query Total($id: ID!) { account(id: $id) { id totalBalance } }`;

/** Keeps a workspace's balance live while the caller is mounted. */
export function useLiveBalance(id, onError) {
  useEffect(() => {
    if (!id) return undefined;
    watch(id);
    const unsubscribe = subscribe({
      query: BALANCE_SUB,
      variables: { id },
      onData: (data) => applyChange(data.balanceChanged),
      onError,
      refresh: async (stillCurrent) => {
        const startedAt = new Date();
        const data = await gql(BALANCE_Q, { id });
        if (data.workspace && stillCurrent()) setBalance(id, data.workspace, startedAt);
      },
    });
    return () => {
      unsubscribe();
      unwatch(id);
    };
  }, [id]);
}

/** Keeps an account's total live while the caller is mounted. */
export function useLiveTotal(accountId, onError) {
  useEffect(() => {
    if (!accountId) return undefined;
    return subscribe({
      query: ACCOUNT_SUB,
      variables: { id: accountId },
      onData: (data) => setTotal(accountId, data.accountBalanceChanged.totalBalance),
      onError,
      refresh: async (stillCurrent) => {
        const data = await gql(TOTAL_Q, { id: accountId });
        if (data.account && stillCurrent()) setTotal(accountId, data.account.totalBalance);
      },
    });
  }, [accountId]);
}
