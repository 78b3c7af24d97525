// The account: every workspace with balance, reserved and available (live), and the total.
import { html, LiveMoney, ErrorBox, Loading, useQuery } from '../ui.js';
import { useState } from 'preact/hooks';
import { gql } from '../api.js';
import { setBalance, setTotal, useBalances, useLiveBalance, useLiveTotal } from '../store.js';

function WorkspaceRow({ ws, role, onError }) {
  useLiveBalance(ws.id, onError);
  const { balance } = useBalances();
  const b = balance(ws.id);
  return html`<tr data-testid="workspace-row" data-workspace=${ws.id}>
    <td><a href=${`#/w/${ws.id}`}>${ws.name}</a></td>
    <td class="num" data-testid="balance"><${LiveMoney} value=${b?.balance} at=${b?.at} testid="balance-value" /></td>
    <td class="num"><${LiveMoney} value=${b?.reserved} at=${b?.at} /></td>
    <td class="num" data-testid="available"><${LiveMoney} value=${b?.available} at=${b?.at} /></td>
    <td><span class="role">${role}</span></td>
  </tr>`;
}

function AccountCard({ account, ctx }) {
  const [error, setError] = useState(null);
  useLiveTotal(account.id, setError);
  const { total } = useBalances();
  return html`<section class="card" data-testid="account" data-account=${account.id}>
    <header class="row">
      <h2>${account.name}</h2>
      <div class="total">Account total <strong data-testid="account-total"><${LiveMoney} value=${total(account.id)} /></strong></div>
    </header>
    <${ErrorBox} error=${error} onClose=${() => setError(null)} />
    ${account.workspaces.length === 0
      ? html`<p class="muted">No workspace of this account is visible to you.</p>`
      : html`<table>
          <thead><tr><th>Workspace</th><th class="num">Balance</th><th class="num">Reserved</th><th class="num">Available</th><th>Your role</th></tr></thead>
          <tbody>${account.workspaces.map((ws) => html`<${WorkspaceRow} key=${ws.id} ws=${ws} role=${ctx.workspaceRole(ws.id)} onError=${setError} />`)}</tbody>
        </table>`}
    <p class="muted small">The total covers every workspace of the account, including any you cannot see.</p>
  </section>`;
}

const BALANCES_Q = `query Balances {
  viewer { accounts { id totalBalance workspaces { id balance reserved available } } }
}`;

export function AccountView({ ctx }) {
  // The session's numbers may be old: read them again on every visit.
  const fresh = useQuery(async () => {
    const startedAt = new Date();
    const data = await gql(BALANCES_Q);
    for (const account of data.viewer.accounts) {
      setTotal(account.id, account.totalBalance);
      for (const ws of account.workspaces) setBalance(ws.id, ws, startedAt);
    }
    return true;
  }, [ctx]);
  if (ctx.accounts.length === 0) return html`<p>You are not a member of any account yet.</p>`;
  if (fresh.error) return html`<${ErrorBox} error=${fresh.error} />`;
  if (!fresh.data) return html`<${Loading} />`;
  return html`<div>${ctx.accounts.map((a) => html`<${AccountCard} key=${a.id} account=${a} ctx=${ctx} />`)}</div>`;
}
