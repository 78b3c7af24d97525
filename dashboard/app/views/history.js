// History: the ledger statement with running balance, purchases with their invoices,
// the account's invoices, transfers; each paginated newest first.
import { html, Money, When, ErrorBox, Loading, Pager, usePager, useQuery } from '../ui.js';
import { gql } from '../api.js';
import { dollars } from '../format.js';
import { explainDecline } from '../errors.js';
import { useState } from 'preact/hooks';

const PAGE = 20;
const PAGE_INFO = 'pageInfo { hasNextPage endCursor }';
const LEDGER_Q = `query Ledger($id: ID!, $first: Int!, $after: String) { workspace(id: $id) { ledger(first: $first, after: $after) {
  edges { node { id kind amount balanceAfter description createdAt } } ${PAGE_INFO} } } }`;
const INVOICE_FIELDS = 'number status total issuedAt dueAt paidAt lines { description amount }';
const PURCHASES_Q = `query Purchases($id: ID!, $first: Int!, $after: String) { workspace(id: $id) { purchases(first: $first, after: $after) {
  edges { node { id status source amount bonus price failureReason createdAt completedAt paymentMethod { brand last4 } invoice { ${INVOICE_FIELDS} } } } ${PAGE_INFO} } } }`;
const TRANSFERS_Q = `query Transfers($id: ID!, $first: Int!, $after: String) { workspace(id: $id) { transfers(first: $first, after: $after) {
  edges { node { id amount memo createdAt from { id name } to { id name } createdBy { name } } } ${PAGE_INFO} } } }`;
const INVOICES_Q = `query Invoices($id: ID!, $first: Int!, $after: String) { account(id: $id) { invoices(first: $first, after: $after) {
  edges { node { id ${INVOICE_FIELDS} } } ${PAGE_INFO} } } }`;

function Paged({ query, variables, pick, testid, render }) {
  const pager = usePager();
  const q = useQuery(() => gql(query, { ...variables, first: PAGE, after: pager.after }).then(pick), [JSON.stringify(variables), pager.after]);
  if (q.error) return html`<${ErrorBox} error=${q.error} />`;
  if (!q.data) return html`<${Loading} />`;
  const nodes = q.data.edges.map((e) => e.node);
  return html`<div data-testid=${testid}>
    ${nodes.length === 0 ? html`<p class="muted">Nothing yet.</p>` : render(nodes)}
    <${Pager} pager=${pager} pageInfo=${q.data.pageInfo} testid=${`${testid}-pager`} />
  </div>`;
}

const statement = (rows) => html`<table>
  <thead><tr><th>Date</th><th>Kind</th><th>Description</th><th class="num">Amount</th><th class="num">Balance after</th></tr></thead>
  <tbody>${rows.map((e) => html`<tr data-testid="ledger-row">
    <td><${When} value=${e.createdAt} /></td><td><span class=${`kind ${e.kind.toLowerCase()}`}>${e.kind.replace('_', ' ').toLowerCase()}</span></td>
    <td>${e.description}</td>
    <td class=${e.amount.startsWith('-') ? 'num neg' : 'num pos'}><${Money} value=${e.amount} /></td>
    <td class="num"><${Money} value=${e.balanceAfter} /></td>
  </tr>`)}</tbody>
</table>`;

function InvoiceLines({ invoice }) {
  if (!invoice) return html`<span class="muted">—</span>`;
  return html`<details><summary>${invoice.number} · ${invoice.status.toLowerCase()}</summary>
    <table class="lines"><tbody>
      ${invoice.lines.map((l) => html`<tr><td>${l.description}</td><td class="num"><${Money} value=${l.amount} /></td></tr>`)}
      <tr class="sum"><td>Total</td><td class="num"><${Money} value=${invoice.total} /></td></tr>
    </tbody></table>
    <small class="muted">Issued <${When} value=${invoice.issuedAt} />${invoice.dueAt ? html`, due <${When} value=${invoice.dueAt} />` : ''}${invoice.paidAt ? html`, paid <${When} value=${invoice.paidAt} />` : ''}</small>
  </details>`;
}

const purchases = (rows) => html`<table>
  <thead><tr><th>Date</th><th>Source</th><th>Status</th><th class="num">Credits</th><th class="num">Bonus</th><th class="num">Paid</th><th>Invoice</th></tr></thead>
  <tbody>${rows.map((p) => html`<tr data-testid="purchase-row">
    <td><${When} value=${p.createdAt} /></td><td>${p.source.replace('_', '-').toLowerCase()}${p.paymentMethod ? html` <small class="muted">${p.paymentMethod.brand} ${p.paymentMethod.last4}</small>` : ''}</td>
    <td><span class=${`pill ${p.status.toLowerCase()}`}>${p.status.toLowerCase()}</span>${p.failureReason ? html` <small class="bad">${explainDecline(p.failureReason)}</small>` : ''}</td>
    <td class="num"><${Money} value=${p.amount} /></td><td class="num"><${Money} value=${p.bonus} /></td><td class="num">${dollars(p.price)}</td>
    <td><${InvoiceLines} invoice=${p.invoice} /></td>
  </tr>`)}</tbody>
</table>`;

const invoices = (rows) => html`<table>
  <thead><tr><th>Number</th><th>Status</th><th class="num">Total</th><th>Issued</th><th>Due</th><th>Lines</th></tr></thead>
  <tbody>${rows.map((i) => html`<tr data-testid="invoice-row">
    <td>${i.number}</td><td><span class=${`pill ${i.status.toLowerCase()}`}>${i.status.toLowerCase()}</span></td><td class="num"><${Money} value=${i.total} /></td>
    <td><${When} value=${i.issuedAt} /></td><td>${i.dueAt ? html`<${When} value=${i.dueAt} />` : '—'}</td><td><${InvoiceLines} invoice=${i} /></td>
  </tr>`)}</tbody>
</table>`;

const transfers = (id) => (rows) => html`<table>
  <thead><tr><th>Date</th><th>From</th><th>To</th><th class="num">Amount</th><th>Memo</th><th>By</th></tr></thead>
  <tbody>${rows.map((t) => html`<tr data-testid="transfer-row">
    <td><${When} value=${t.createdAt} /></td><td>${t.from.name}</td><td>${t.to.name}</td>
    <td class=${t.from.id === id ? 'num neg' : 'num pos'}><${Money} value=${t.from.id === id ? `-${t.amount}` : t.amount} /></td>
    <td>${t.memo ?? ''}</td><td>${t.createdBy?.name ?? '—'}</td>
  </tr>`)}</tbody>
</table>`;

export function HistoryView({ id, ctx }) {
  const ws = ctx.workspaces.get(id);
  const [tab, setTab] = useState('ledger');
  if (!ws) return html`<p>This workspace was not found, or you do not have access to it.</p>`;
  const invoicesAllowed = ctx.accountAdmin(ws.account.id);
  const tabs = [['ledger', 'Statement'], ['purchases', 'Purchases'], ...(invoicesAllowed ? [['invoices', 'Invoices']] : []), ['transfers', 'Transfers']];
  return html`<section class="card">
    <nav class="subtabs">${tabs.map(([key, label]) => html`<button class=${tab === key ? 'tab active' : 'tab'} data-testid=${`history-${key}`} onClick=${() => setTab(key)}>${label}</button>`)}</nav>
    ${tab === 'ledger' && html`<${Paged} testid="ledger" query=${LEDGER_Q} variables=${{ id }} pick=${(d) => d.workspace.ledger} render=${statement} />`}
    ${tab === 'purchases' && html`<${Paged} testid="purchases" query=${PURCHASES_Q} variables=${{ id }} pick=${(d) => d.workspace.purchases} render=${purchases} />`}
    ${tab === 'invoices' && html`<${Paged} testid="invoices" query=${INVOICES_Q} variables=${{ id: ws.account.id }} pick=${(d) => d.account.invoices} render=${invoices} />`}
    ${tab === 'transfers' && html`<${Paged} testid="transfers" query=${TRANSFERS_Q} variables=${{ id }} pick=${(d) => d.workspace.transfers} render=${transfers(id)} />`}
  </section>`;
}
