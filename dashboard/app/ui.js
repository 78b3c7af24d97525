// Small shared components.
import { h } from 'preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import htm from 'htm';
import uPlot from 'uplot';
import { dollars, exact, when, pct, clock } from './format.js';
import { explain } from './errors.js';
import { liveStatus, onLiveStatus } from './live.js';

export const html = htm.bind(h);

/** An amount as "$1,234.56", the exact credits on hover. */
export function Money({ value, testid }) {
  return html`<span class="money" title=${exact(value)} data-testid=${testid} data-exact=${value}>${dollars(value)}</span>`;
}

export function When({ value }) {
  return html`<time datetime=${value ?? ''} title=${value ?? ''}>${when(value)}</time>`;
}

/** An error in words, its stable code in small print. */
export function ErrorBox({ error, onClose }) {
  if (!error) return null;
  return html`<div class="error" role="alert" data-testid="error" data-code=${error.code}>
    <span>${explain(error)}</span>
    <small class="code">${error.code ?? 'ERROR'}</small>
    ${onClose && html`<button class="link" onClick=${onClose} aria-label="Dismiss">×</button>`}
  </div>`;
}

/** The WebSocket's state, for balances: live, or stale "as of" the last live moment. */
export function useLiveStatus() {
  const [status, setStatus] = useState(liveStatus());
  useEffect(() => {
    const unlisten = onLiveStatus(setStatus);
    setStatus(liveStatus()); // a change between the first render and this effect
    return unlisten;
  }, []);
  return status;
}

/** A live balance: greyed and marked "as of" while updates are interrupted. */
export function LiveMoney({ value, at, testid }) {
  const status = useLiveStatus();
  if (value == null) return html`<span class="muted">…</span>`;
  const stale = status.status !== 'live';
  return html`<span class=${stale ? 'stale' : 'live'} data-live=${stale ? 'stale' : 'live'}
      title=${stale ? `Not live: last known${at ? ' at ' + clock(at) : ''}` : 'Live'}>
    <${Money} value=${value} testid=${testid} />
  </span>`;
}

export function ConnectionBanner() {
  const status = useLiveStatus();
  if (status.status === 'live') return null;
  const text = {
    connecting: 'Connecting to live updates…',
    offline: `Live updates interrupted; reconnecting. Balances are shown as of ${clock(status.lastLive ?? status.since)} and may be out of date.`,
    'catching-up': 'Reconnected; catching up…',
  }[status.status];
  return html`<div class="banner" data-testid="connection" data-status=${status.status}>${text}</div>`;
}

/** A horizontal bar, `part` of `whole`. */
export function Bar({ part, whole, warn = 80 }) {
  const p = pct(part, whole);
  return html`<div class="bar" title=${`${p.toFixed(1)}%`}><div class=${p >= warn ? 'fill hot' : 'fill'} style=${`width:${p}%`}></div></div>`;
}

export function Loading() {
  return html`<p class="muted">Loading…</p>`;
}

/** A daily-spend bar chart (uPlot): `days` are [unix seconds, dollars]. */
export function SpendChart({ days }) {
  const box = useRef(null);
  useEffect(() => {
    if (!box.current) return undefined;
    const width = Math.max(320, box.current.clientWidth || 640);
    const plot = new uPlot(
      {
        width,
        height: 220,
        legend: { show: false },
        cursor: { points: { show: false } },
        scales: { x: { time: true, range: (u, min, max) => [min - 43_200, max + 43_200] }, y: { range: (u, min, max) => [0, Math.max(max * 1.15, 0.01)] } },
        axes: [{}, { values: (u, ticks) => ticks.map((t) => `$${t.toLocaleString(undefined, { maximumFractionDigits: 2 })}`), size: 80 }],
        series: [
          {},
          { label: 'Spend', fill: 'rgba(37, 99, 235, 0.55)', stroke: '#2563eb', width: 1, paths: uPlot.paths.bars({ size: [0.7, 40] }), points: { show: false } },
        ],
      },
      [days.map((d) => d[0]), days.map((d) => d[1])],
      box.current,
    );
    return () => plot.destroy();
  }, [JSON.stringify(days)]);
  return html`<div class="chart" ref=${box} data-testid="spend-chart"></div>`;
}

/** Newest-first pages over a Relay connection: Next follows endCursor, Previous pops. */
export function usePager() {
  const [stack, setStack] = useState([null]);
  return {
    after: stack[stack.length - 1],
    page: stack.length,
    next: (cursor) => setStack([...stack, cursor]),
    previous: () => setStack(stack.length > 1 ? stack.slice(0, -1) : stack),
    reset: () => setStack([null]),
  };
}

export function Pager({ pager, pageInfo, testid }) {
  return html`<div class="pager" data-testid=${testid}>
    <button class="secondary" disabled=${pager.page <= 1} onClick=${pager.previous}>← Newer</button>
    <span class="muted">Page ${pager.page}</span>
    <button class="secondary" disabled=${!pageInfo?.hasNextPage} onClick=${() => pager.next(pageInfo.endCursor)}>Older →</button>
  </div>`;
}

/** Runs a mutation with a busy flag and an error in words. */
export function useAction() {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const run = async (fn) => {
    setBusy(true);
    setError(null);
    try {
      return await fn();
    } catch (e) {
      setError(e);
      return null;
    } finally {
      setBusy(false);
    }
  };
  return { busy, error, run, clear: () => setError(null) };
}

/** Loads `load()` on mount and whenever `deps` change; `reload` runs it again. */
export function useQuery(load, deps) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let alive = true;
    setState((s) => ({ ...s, loading: true }));
    load()
      .then((data) => alive && setState({ data, error: null, loading: false }))
      .catch((error) => alive && setState({ data: null, error, loading: false }));
    return () => {
      alive = false;
    };
  }, [...deps, tick]);
  return { ...state, reload: () => setTick((n) => n + 1) };
}
