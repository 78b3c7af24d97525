// A workspace: live balance, burn rate and depletion, the 30-day spend chart, usage by
// project, member and model, project budgets, members and roles.
import { html, LiveMoney, Money, When, ErrorBox, Loading, Bar, SpendChart, useQuery } from '../ui.js';
import { gql } from '../api.js';
import { chartValue, day, toNanos } from '../format.js';
import { setBalance, useBalances, useLiveBalance } from '../store.js';
import { useState } from 'preact/hooks';

const DAY_MS = 86_400_000;
const compact = new Intl.NumberFormat(undefined, { notation: 'compact', maximumFractionDigits: 1 });

const WORKSPACE_Q = `query Workspace($id: ID!, $from: DateTime!, $to: DateTime!) {
  workspace(id: $id) {
    id name balance reserved available
    spend { averageDailySpend projectedDepletionAt }
    daily: usage(from: $from, to: $to, groupBy: [DAY]) { cost requests rows { day cost } }
    byProject: usage(from: $from, to: $to, groupBy: [PROJECT]) { rows { project { id name tag } requests promptTokens completionTokens cost } }
    byMember: usage(from: $from, to: $to, groupBy: [MEMBER]) { rows { user { id name email } requests promptTokens completionTokens cost } }
    byModel: usage(from: $from, to: $to, groupBy: [MODEL]) { rows { model { id name } requests promptTokens completionTokens cost } }
    projects { id name tag budget { limit period spent remaining periodStart resetsAt } }
    members { role user { id name email } }
    account { members { role user { id name email } } }
  }
}`;

/** The last 30 UTC days (today included), as the API's DAY rows are UTC midnights. */
export function window30() {
  const today = new Date();
  const end = Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate()) + DAY_MS;
  return { from: new Date(end - 30 * DAY_MS).toISOString(), to: new Date(end).toISOString(), end };
}

function dailySeries(rows, end) {
  const byDay = new Map(rows.map((r) => [Date.parse(r.day), chartValue(r.cost)]));
  const days = [];
  for (let t = end - 30 * DAY_MS; t < end; t += DAY_MS) days.push([t / 1000, byDay.get(t) ?? 0]);
  return days;
}

function Breakdown({ title, column, rows, label, testid }) {
  const sorted = [...rows].sort((a, b) => (toNanos(b.cost) > toNanos(a.cost) ? 1 : -1));
  const top = sorted[0]?.cost ?? '0';
  return html`<section class="card" data-testid=${testid}>
    <h3>${title}</h3>
    ${sorted.length === 0
      ? html`<p class="muted">No usage in the last 30 days.</p>`
      : html`<table>
          <thead><tr><th>${column}</th><th class="num">Tokens in / out</th><th class="num">Cost</th><th class="barcol"></th></tr></thead>
          <tbody>${sorted.map((r) => html`<tr>
            <td>${label(r)}</td>
            <td class="num" title=${`${r.requests.toLocaleString()} requests: ${r.promptTokens.toLocaleString()} prompt + ${r.completionTokens.toLocaleString()} completion tokens`}>${compact.format(r.promptTokens)} / ${compact.format(r.completionTokens)}</td>
            <td class="num"><${Money} value=${r.cost} /></td>
            <td class="barcol"><${Bar} part=${r.cost} whole=${top} warn=${101} /></td>
          </tr>`)}</tbody>
        </table>`}
  </section>`;
}

function Budgets({ projects }) {
  return html`<section class="card" data-testid="budgets">
    <h3>Project budgets</h3>
    <table>
      <thead><tr><th>Project</th><th>Period</th><th class="num">Spent</th><th class="num">Limit</th><th class="barcol">Used</th><th>Resets</th></tr></thead>
      <tbody>${projects.map((p) => html`<tr>
        <td>${p.name} <small class="muted">${p.tag}</small></td>
        ${p.budget
          ? html`<td>${p.budget.period.toLowerCase()}</td>
              <td class="num"><${Money} value=${p.budget.spent} /></td>
              <td class="num"><${Money} value=${p.budget.limit} /></td>
              <td class="barcol"><${Bar} part=${p.budget.spent} whole=${p.budget.limit} /></td>
              <td>${p.budget.resetsAt ? html`<${When} value=${p.budget.resetsAt} />` : 'never'}</td>`
          : html`<td colspan="5" class="muted">No cap</td>`}
      </tr>`)}</tbody>
    </table>
  </section>`;
}

/** The workspace's members, and the account's owners and admins (admins of every workspace). */
export function Members({ members, accountMembers }) {
  const own = new Set(members.map((m) => m.user.id));
  const admins = accountMembers.filter((m) => m.role !== 'MEMBER' && !own.has(m.user.id));
  const rows = [
    ...admins.map((m) => ({ user: m.user, role: 'ADMIN', via: `account ${m.role.toLowerCase()}` })),
    ...members.map((m) => ({ user: m.user, role: m.role, via: null })),
  ];
  return html`<section class="card" data-testid="members">
    <h3>Members</h3>
    <table>
      <thead><tr><th>Name</th><th>E-mail</th><th>Role</th></tr></thead>
      <tbody>${rows.map((m) => html`<tr data-testid="member-row"><td>${m.user.name}</td><td>${m.user.email}</td>
        <td><span class="role">${m.role}</span>${m.via && html` <small class="muted">as ${m.via}</small>`}</td></tr>`)}</tbody>
    </table>
  </section>`;
}

/** The live balance header shared by the workspace's tabs. */
export function BalanceHeader({ id }) {
  const [error, setError] = useState(null);
  useLiveBalance(id, setError);
  const b = useBalances().balance(id);
  return html`<div class="stats" data-testid="balance-header">
    <div class="stat"><span>Balance</span><strong data-testid="ws-balance"><${LiveMoney} value=${b?.balance} at=${b?.at} testid="ws-balance-value" /></strong></div>
    <div class="stat"><span>Reserved</span><strong><${LiveMoney} value=${b?.reserved} at=${b?.at} /></strong></div>
    <div class="stat"><span>Available</span><strong data-testid="ws-available"><${LiveMoney} value=${b?.available} at=${b?.at} /></strong></div>
    <${ErrorBox} error=${error} onClose=${() => setError(null)} />
  </div>`;
}

export function WorkspaceView({ id }) {
  const { from, to, end } = window30();
  const q = useQuery(async () => {
    const startedAt = new Date();
    const data = await gql(WORKSPACE_Q, { id, from, to });
    if (data.workspace) setBalance(id, data.workspace, startedAt);
    return data.workspace;
  }, [id]);
  if (q.error) return html`<${ErrorBox} error=${q.error} />`;
  if (q.loading && !q.data) return html`<${Loading} />`;
  const ws = q.data;
  if (!ws) return html`<p>This workspace was not found, or you do not have access to it.</p>`;
  return html`<div>
    <div class="stats">
      <div class="stat"><span>Average daily spend (7 days)</span><strong data-testid="avg-spend"><${Money} value=${ws.spend.averageDailySpend} /></strong></div>
      <div class="stat"><span>Projected depletion</span><strong data-testid="depletion">${ws.spend.projectedDepletionAt ? day(ws.spend.projectedDepletionAt) : 'No recent spend'}</strong></div>
      <div class="stat"><span>Spent, last 30 days</span><strong><${Money} value=${ws.daily.cost} /></strong></div>
    </div>
    <section class="card">
      <h3>Daily spend, last 30 days</h3>
      <${SpendChart} days=${dailySeries(ws.daily.rows, end)} />
    </section>
    <div class="grid">
      <${Breakdown} title="By project" column="Project" testid="by-project" rows=${ws.byProject.rows} label=${(r) => r.project?.name ?? html`<span class="muted">no project</span>`} />
      <${Breakdown} title="By member" column="Member" testid="by-member" rows=${ws.byMember.rows} label=${(r) => r.user?.name ?? html`<span class="muted">API key only</span>`} />
      <${Breakdown} title="By model" column="Model" testid="by-model" rows=${ws.byModel.rows} label=${(r) => r.model?.name ?? '?'} />
    </div>
    <${Budgets} projects=${ws.projects} />
    <${Members} members=${ws.members} accountMembers=${ws.account.members} />
  </div>`;
}
