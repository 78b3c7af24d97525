// The billing dashboard: sign-in, routes and the frame around the views.
// Routes live in the fragment (#/, #/w/<id>, #/w/<id>/money, #/w/<id>/history), so the
// server serves one page; `#token=<token>` signs in and is removed from the address bar.
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { html, ConnectionBanner, ErrorBox, Loading, useLiveStatus } from './ui.js';
import { onSignOut, signIn, signOut, takeTokenFromLocation, token } from './api.js';
import { connect, disconnect } from './live.js';
import { loadSession } from './session.js';
import { explain } from './errors.js';
import { AccountView } from './views/account.js';
import { BalanceHeader, WorkspaceView } from './views/workspace.js';
import { MoneyView } from './views/money.js';
import { HistoryView } from './views/history.js';

function parseRoute(hash) {
  const m = /^#\/w\/([^/]+)(?:\/(money|history))?/.exec(hash);
  return m ? { view: m[2] ?? 'overview', id: decodeURIComponent(m[1]) } : { view: 'account' };
}

function useRoute() {
  const [route, setRoute] = useState(parseRoute(window.location.hash));
  useEffect(() => {
    const listener = () => setRoute(parseRoute(window.location.hash));
    window.addEventListener('hashchange', listener);
    return () => window.removeEventListener('hashchange', listener);
  }, []);
  return route;
}

function SignIn({ reason, onSignedIn }) {
  const [value, setValue] = useState('');
  const submit = (e) => {
    e.preventDefault();
    if (!value.trim()) return;
    signIn(value);
    onSignedIn();
  };
  return html`<main class="signin">
    <h1>Reservoir billing</h1>
    ${reason && html`<div class="error" role="alert" data-testid="signed-out"><span>${explain(reason)}</span><small class="code">${reason.code}</small></div>`}
    <form onSubmit=${submit} class="card">
      <label>User token <input type="password" autocomplete="off" data-testid="token-input" placeholder="rsv_u_…" value=${value} onInput=${(e) => setValue(e.target.value)} /></label>
      <button type="submit" data-testid="sign-in">Sign in</button>
      <p class="muted small">The token stays in this browser tab only (session storage). A link ending in <code>#token=…</code> signs in directly.</p>
    </form>
  </main>`;
}

function WorkspaceFrame({ route, ctx }) {
  const ws = ctx.workspaces.get(route.id);
  if (!ws) return html`<p>This workspace was not found, or you do not have access to it. <a href="#/">All workspaces</a></p>`;
  const tab = (view, label) => html`<a class=${route.view === view ? 'tab active' : 'tab'} data-testid=${`tab-${view}`} href=${`#/w/${ws.id}${view === 'overview' ? '' : '/' + view}`}>${label}</a>`;
  return html`<div>
    <p class="crumbs"><a href="#/">${ws.account.name}</a> › <span class="role">${ctx.workspaceRole(ws.id)}</span></p>
    <h2 data-testid="workspace-name">${ws.name}</h2>
    <${BalanceHeader} key=${ws.id} id=${ws.id} />
    <nav class="tabs">${tab('overview', 'Overview')}${tab('money', 'Money')}${tab('history', 'History')}</nav>
    ${route.view === 'overview' && html`<${WorkspaceView} key=${ws.id} id=${ws.id} />`}
    ${route.view === 'money' && html`<${MoneyView} key=${ws.id} id=${ws.id} ctx=${ctx} />`}
    ${route.view === 'history' && html`<${HistoryView} key=${ws.id} id=${ws.id} ctx=${ctx} />`}
  </div>`;
}

function Dashboard({ ctx }) {
  const route = useRoute();
  const live = useLiveStatus();
  const who = ctx.me ? ctx.me.name : 'Platform admin';
  return html`<div class="frame">
    <header class="top">
      <a href="#/" class="brand">Reservoir <span>billing</span></a>
      <span class=${`dot ${live.status}`} title=${`live updates: ${live.status}`} data-testid="live-dot"></span>
      <span class="grow"></span>
      <span class="who" data-testid="who">${who}</span>
      <a href="/" class="secondary">GraphiQL</a>
      <button class="secondary" data-testid="sign-out" onClick=${() => signOut(null)}>Sign out</button>
    </header>
    <${ConnectionBanner} />
    <main>${route.view === 'account' ? html`<${AccountView} ctx=${ctx} />` : html`<${WorkspaceFrame} route=${route} ctx=${ctx} />`}</main>
  </div>`;
}

function App() {
  const [signedIn, setSignedIn] = useState(Boolean(token()));
  const [reason, setReason] = useState(null);
  const [ctx, setCtx] = useState(null);
  const [error, setError] = useState(null);
  useEffect(
    () =>
      onSignOut((why) => {
        disconnect();
        setCtx(null);
        setReason(why);
        setSignedIn(false);
      }),
    [],
  );
  useEffect(() => {
    if (!signedIn) return;
    setError(null);
    loadSession()
      .then((s) => {
        setCtx(s);
        connect();
      })
      .catch(setError);
  }, [signedIn]);
  if (!signedIn) return html`<${SignIn} reason=${reason} onSignedIn=${() => { setReason(null); setSignedIn(true); }} />`;
  if (error) return html`<main class="signin"><${ErrorBox} error=${error} /><button onClick=${() => signOut(null)}>Sign out</button></main>`;
  if (!ctx) return html`<main><${Loading} /></main>`;
  return html`<${Dashboard} ctx=${ctx} />`;
}

takeTokenFromLocation();
render(html`<${App} />`, document.getElementById('app'));
