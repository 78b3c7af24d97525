// Money settings: auto-reload, alert thresholds, stored cards.
import { html, Money, When, ErrorBox, useAction } from '../ui.js';
import { gql } from '../api.js';
import { parseAmount } from '../format.js';
import { explainDecline } from '../errors.js';
import { useState } from 'preact/hooks';

const RELOAD_M = `mutation Reload($input: ConfigureAutoReloadInput!) { configureAutoReload(input: $input) { enabled } }`;
const ALERTS_M = `mutation Alerts($input: SetAlertThresholdsInput!) { setAlertThresholds(input: $input) { id } }`;
const ADD_CARD_M = `mutation AddCard($input: AddPaymentMethodInput!) { addPaymentMethod(input: $input) { id } }`;
const REMOVE_CARD_M = `mutation RemoveCard($id: ID!) { removePaymentMethod(id: $id) }`;

export const cardLabel = (c) => (c ? `${c.brand} •••• ${c.last4}` : 'the default card');

function reloadOutcome(r) {
  if (r.status === 'DISABLED_AFTER_FAILURES')
    return html`<span class="bad">Turned off after ${r.consecutiveFailures} failed payments${r.lastFailureReason ? `: ${explainDecline(r.lastFailureReason)}` : ''}</span>`;
  if (r.status === 'RELOADING') return html`<span>A reload is being charged now.</span>`;
  if (r.lastFailureReason && r.consecutiveFailures > 0)
    return html`<span class="bad">Last attempt failed (${r.consecutiveFailures} in a row): ${explainDecline(r.lastFailureReason)}</span>`;
  if (r.lastReloadAt) return html`<span class="ok">Last reload succeeded on <${When} value=${r.lastReloadAt} />.</span>`;
  return html`<span class="muted">No reload yet.</span>`;
}

function ReloadForm({ ws, cards, cardsAllowed, onSaved }) {
  const r = ws.autoReload;
  const action = useAction();
  const [enabled, setEnabled] = useState(r.enabled);
  const fresh = !r.enabled && r.threshold === '0'; // never configured: suggest something
  const [threshold, setThreshold] = useState(fresh ? '20' : String(r.threshold));
  const [amount, setAmount] = useState(fresh ? '50' : String(r.amount));
  const [card, setCard] = useState(r.paymentMethod?.id ?? '');
  const [cap, setCap] = useState(r.maxReloadsPerDay);
  const [saved, setSaved] = useState(false);
  const save = () =>
    action.run(async () => {
      const input = { workspaceId: ws.id, enabled, threshold: parseAmount(threshold) ?? threshold, amount: parseAmount(amount) ?? amount, maxReloadsPerDay: Number(cap) };
      if (card) input.paymentMethodId = card;
      await gql(RELOAD_M, { input });
      setSaved(true);
      onSaved();
    });
  return html`<div class="row form">
    <label class="toggle"><input type="checkbox" data-testid="reload-enabled" checked=${enabled} onChange=${(e) => { setEnabled(e.target.checked); setSaved(false); }} /> Enabled</label>
    <label>Below <input data-testid="reload-threshold" value=${threshold} onInput=${(e) => setThreshold(e.target.value)} /></label>
    <label>Buy <input data-testid="reload-amount" value=${amount} onInput=${(e) => setAmount(e.target.value)} /></label>
    ${cardsAllowed && html`<label>Card <select value=${card} onChange=${(e) => setCard(e.target.value)}>
      <option value="">Default card</option>${cards.map((c) => html`<option value=${c.id}>${cardLabel(c)}</option>`)}</select></label>`}
    <label>At most <input type="number" min="1" max="24" class="short" value=${cap} onInput=${(e) => setCap(e.target.value)} /> per day</label>
    <button data-testid="reload-save" disabled=${action.busy} onClick=${save}>Save</button>
    ${saved && !action.error && html`<span class="ok" data-testid="reload-saved">Saved.</span>`}
    <${ErrorBox} error=${action.error} onClose=${action.clear} />
  </div>`;
}

export function AutoReloadCard({ ws, cards, admin, cardsAllowed, onSaved }) {
  const r = ws.autoReload;
  return html`<section class="card" data-testid="auto-reload" data-enabled=${r.enabled ? 'on' : 'off'}>
    <h3>Auto-reload <span class=${r.enabled ? 'pill on' : 'pill'} data-testid="reload-state">${r.enabled ? 'on' : 'off'}</span></h3>
    <p>${r.enabled
      ? html`When the balance falls below <${Money} value=${r.threshold} />, buy <${Money} value=${r.amount} /> with ${cardLabel(r.paymentMethod)}, at most ${r.maxReloadsPerDay} times a day.`
      : 'Off: the balance is not refilled automatically.'}</p>
    <p data-testid="reload-outcome">${reloadOutcome(r)}</p>
    ${admin && html`<${ReloadForm} key=${JSON.stringify(r)} ws=${ws} cards=${cards} cardsAllowed=${cardsAllowed} onSaved=${onSaved} />`}
  </section>`;
}

function AlertsForm({ ws, onSaved }) {
  const action = useAction();
  const [rows, setRows] = useState(ws.alertThresholds.map((t) => ({ amount: t.amount, severity: t.severity, recipients: t.recipients.map((u) => u.id) })));
  const update = (i, patch) => setRows(rows.map((r, j) => (i === j ? { ...r, ...patch } : r)));
  const save = () =>
    action.run(async () => {
      const thresholds = rows.map((r) => ({ amount: parseAmount(r.amount) ?? r.amount, severity: r.severity, recipientIds: r.recipients }));
      await gql(ALERTS_M, { input: { workspaceId: ws.id, thresholds } });
      onSaved();
    });
  return html`<div class="form">
    ${rows.map((r, i) => html`<div class="row">
      <label>Below <input value=${r.amount} onInput=${(e) => update(i, { amount: e.target.value })} /></label>
      <select value=${r.severity} onChange=${(e) => update(i, { severity: e.target.value })}><option>WARNING</option><option>URGENT</option></select>
      <span class="recipients">${ws.members.map((m) => html`<label class="check"><input type="checkbox" checked=${r.recipients.includes(m.user.id)}
        onChange=${(e) => update(i, { recipients: e.target.checked ? [...r.recipients, m.user.id] : r.recipients.filter((x) => x !== m.user.id) })} />${m.user.name}</label>`)}</span>
      <button class="secondary" onClick=${() => setRows(rows.filter((_, j) => j !== i))}>Remove</button>
    </div>`)}
    <div class="row">
      <button class="secondary" disabled=${rows.length >= 10} onClick=${() => setRows([...rows, { amount: '10', severity: 'WARNING', recipients: [] }])}>Add threshold</button>
      <button data-testid="alerts-save" disabled=${action.busy} onClick=${save}>Save thresholds</button>
    </div>
    <${ErrorBox} error=${action.error} onClose=${action.clear} />
  </div>`;
}

export function AlertsCard({ ws, admin, onSaved }) {
  return html`<section class="card" data-testid="alerts">
    <h3>Low-balance alerts</h3>
    ${ws.alertThresholds.length === 0
      ? html`<p class="muted">No alert thresholds.</p>`
      : html`<table>
          <thead><tr><th class="num">Below</th><th>Severity</th><th>Recipients</th><th>State</th><th>Last fired</th></tr></thead>
          <tbody>${ws.alertThresholds.map((t) => html`<tr>
            <td class="num"><${Money} value=${t.amount} /></td><td>${t.severity.toLowerCase()}</td>
            <td>${t.recipients.map((u) => u.name).join(', ') || html`<span class="muted">nobody</span>`}</td>
            <td>${t.armed ? 'armed' : 'fired'}</td><td>${t.lastTriggeredAt ? html`<${When} value=${t.lastTriggeredAt} />` : '—'}</td>
          </tr>`)}</tbody>
        </table>`}
    ${admin && html`<details><summary>Edit thresholds</summary><${AlertsForm} key=${JSON.stringify(ws.alertThresholds)} ws=${ws} onSaved=${onSaved} /></details>`}
  </section>`;
}

export function CardsCard({ accountId, cards, onChanged }) {
  const action = useAction();
  const [tokenText, setTokenText] = useState('');
  const [makeDefault, setMakeDefault] = useState(false);
  const add = () =>
    action.run(async () => {
      await gql(ADD_CARD_M, { input: { accountId, token: tokenText.trim(), makeDefault } });
      setTokenText('');
      onChanged();
    });
  const remove = (id) =>
    action.run(async () => {
      await gql(REMOVE_CARD_M, { id });
      onChanged();
    });
  return html`<section class="card" data-testid="cards">
    <h3>Stored cards</h3>
    ${cards.length === 0
      ? html`<p class="muted">No card on file.</p>`
      : html`<table><tbody>${cards.map((c) => html`<tr data-testid="card-row">
          <td>${cardLabel(c)}</td><td>expires ${String(c.expMonth).padStart(2, '0')}/${c.expYear}</td>
          <td>${c.isDefault ? html`<span class="pill on">default</span>` : ''}</td>
          <td class="num"><button class="secondary" disabled=${action.busy} onClick=${() => remove(c.id)}>Remove</button></td>
        </tr>`)}</tbody></table>`}
    <div class="row form">
      <label>Card token <input data-testid="card-token" class="wide" placeholder="from your payment form, e.g. tok_visa" value=${tokenText} onInput=${(e) => setTokenText(e.target.value)} /></label>
      <label class="check"><input type="checkbox" checked=${makeDefault} onChange=${(e) => setMakeDefault(e.target.checked)} /> make default</label>
      <button data-testid="card-add" disabled=${action.busy || !tokenText.trim()} onClick=${add}>Add card</button>
    </div>
    <p class="muted small">Card numbers never reach Reservoir: a payment form (Stripe.js) turns them into a token. The sandbox gateway takes test tokens such as tok_visa.</p>
    <${ErrorBox} error=${action.error} onClose=${action.clear} />
  </section>`;
}

