// Money: buy credits (a package with its bonus, or a custom amount) with the purchase's
// progress live; transfers; auto-reload; alert thresholds; stored cards. Every form is
// shown only to a role the API accepts it from; others see the settings read-only.
import { html, Money, ErrorBox, Loading, useAction, useQuery } from '../ui.js';
import { gql, idempotencyKey } from '../api.js';
import { subscribe } from '../live.js';
import { addCredits, dollars, parseAmount } from '../format.js';
import { explainDecline } from '../errors.js';
import { useEffect, useRef, useState } from 'preact/hooks';
import { AlertsCard, AutoReloadCard, CardsCard, cardLabel } from './settings.js';

const MONEY_Q = `query Money($id: ID!) {
  creditPackages { id amount price bonus }
  workspace(id: $id) {
    id name account { id verified }
    autoReload { enabled threshold amount maxReloadsPerDay status consecutiveFailures lastReloadAt lastFailureReason paymentMethod { id brand last4 } }
    alertThresholds { id amount severity armed lastTriggeredAt recipients { id name email } }
    members { role user { id name email } }
  }
}`;
const CARDS_Q = `query Cards($id: ID!) { account(id: $id) { id paymentMethods { id brand last4 expMonth expYear isDefault } } }`;
const PURCHASE_FIELDS = 'id status source amount bonus price failureReason createdAt completedAt';
const PURCHASE_SUB = `subscription Purchases($id: ID!) { purchaseUpdated(workspaceId: $id) { ${PURCHASE_FIELDS} } }`;
const BUY_M = `mutation Buy($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { ${PURCHASE_FIELDS} } }`;
const TRANSFER_M = `mutation Transfer($input: TransferCreditsInput!) { transferCredits(input: $input) { id amount to { name } } }`;

function PurchaseProgress({ purchase }) {
  if (!purchase) return null;
  const total = addCredits(purchase.amount, purchase.bonus);
  const text = {
    PENDING: html`Charging ${dollars(purchase.price)}… the credits arrive as soon as the payment is captured.`,
    SUCCEEDED: html`Credited <${Money} value=${purchase.amount} /> + <${Money} value=${purchase.bonus} /> bonus = <strong><${Money} value=${total} /></strong>.`,
    FAILED: html`Payment failed: ${explainDecline(purchase.failureReason)} Nothing was credited.`,
  }[purchase.status];
  return html`<div class=${`progress ${purchase.status.toLowerCase()}`} data-testid="purchase-progress" data-status=${purchase.status}>
    <span class="step">${purchase.status}</span> ${text}
  </div>`;
}

function BuyCredits({ ws, packages, cards, canPickCard }) {
  const action = useAction();
  const [card, setCard] = useState('');
  const [custom, setCustom] = useState('');
  const [purchase, setPurchase] = useState(null);
  // Updates may arrive before the mutation's answer: keep the latest of each purchase.
  const seen = useRef(new Map());
  useEffect(
    () =>
      subscribe({
        query: PURCHASE_SUB,
        variables: { id: ws.id },
        onData: (d) => {
          const update = d.purchaseUpdated;
          seen.current.set(update.id, update);
          setPurchase((p) => (p && p.id === update.id ? update : p));
        },
      }),
    [ws.id],
  );
  const buy = (item) =>
    action.run(async () => {
      const input = { workspaceId: ws.id, idempotencyKey: idempotencyKey('buy'), ...item };
      if (card) input.paymentMethodId = card;
      const data = await gql(BUY_M, { input });
      setPurchase(seen.current.get(data.purchaseCredits.id) ?? data.purchaseCredits);
    });
  const customAmount = parseAmount(custom);
  const noCard = canPickCard && cards.length === 0;
  return html`<section class="card" data-testid="buy">
    <h3>Buy credits</h3>
    ${noCard && html`<p class="muted">Add a card below before buying credits.</p>`}
    <div class="packages">${packages.map((p) => html`<button class="package" data-testid="package" data-package=${p.id} disabled=${action.busy || noCard} onClick=${() => buy({ packageId: p.id })}>
      <strong><${Money} value=${p.amount} /></strong>
      ${p.bonus !== '0' ? html`<span class="bonus" data-testid="bonus">+ <${Money} value=${p.bonus} /> bonus</span>` : html`<span class="muted">no bonus</span>`}
      <span class="muted">pay ${dollars(p.price)}</span>
    </button>`)}</div>
    <div class="row form">
      <label>Custom amount <input data-testid="custom-amount" inputmode="decimal" placeholder="$5 – $100,000" value=${custom} onInput=${(e) => setCustom(e.target.value)} /></label>
      <button data-testid="buy-custom" disabled=${action.busy || noCard || !customAmount} onClick=${() => buy({ amount: customAmount })}>Buy ${customAmount ? dollars(customAmount) : ''}</button>
      ${canPickCard
        ? html`<label>Card <select value=${card} onChange=${(e) => setCard(e.target.value)}>
            <option value="">Default card</option>
            ${cards.map((c) => html`<option value=${c.id}>${cardLabel(c)}</option>`)}
          </select></label>`
        : html`<span class="muted small">Charged to the account's default card.</span>`}
    </div>
    <${ErrorBox} error=${action.error} onClose=${action.clear} />
    <${PurchaseProgress} purchase=${purchase} />
  </section>`;
}

function TransferForm({ ws, targets, onDone }) {
  const action = useAction();
  const [to, setTo] = useState(targets[0]?.id ?? '');
  const [amount, setAmount] = useState('');
  const [memo, setMemo] = useState('');
  const [done, setDone] = useState(null);
  const value = parseAmount(amount);
  const send = () =>
    action.run(async () => {
      const input = { fromWorkspaceId: ws.id, toWorkspaceId: to, amount: value, idempotencyKey: idempotencyKey('transfer') };
      if (memo.trim()) input.memo = memo.trim();
      const data = await gql(TRANSFER_M, { input });
      setDone(data.transferCredits);
      setAmount('');
      onDone?.();
    });
  return html`<section class="card" data-testid="transfer">
    <h3>Transfer to another workspace</h3>
    ${targets.length === 0
      ? html`<p class="muted">No other workspace of this account where you are an admin.</p>`
      : html`<div class="row form">
          <label>To <select value=${to} onChange=${(e) => setTo(e.target.value)}>${targets.map((t) => html`<option value=${t.id}>${t.name}</option>`)}</select></label>
          <label>Amount <input data-testid="transfer-amount" inputmode="decimal" value=${amount} onInput=${(e) => setAmount(e.target.value)} /></label>
          <label>Memo <input value=${memo} onInput=${(e) => setMemo(e.target.value)} /></label>
          <button data-testid="transfer-submit" disabled=${action.busy || !value || !to} onClick=${send}>Transfer</button>
        </div>`}
    <${ErrorBox} error=${action.error} onClose=${action.clear} />
    ${done && html`<p class="ok">Moved <${Money} value=${done.amount} /> to ${done.to.name}.</p>`}
  </section>`;
}

export function MoneyView({ id, ctx }) {
  const ws = ctx.workspaces.get(id);
  const accountId = ws?.account.id;
  const cardsAllowed = Boolean(accountId && ctx.accountAdmin(accountId));
  const q = useQuery(async () => {
    const [money, cards] = await Promise.all([
      gql(MONEY_Q, { id }),
      cardsAllowed ? gql(CARDS_Q, { id: accountId }) : Promise.resolve(null),
    ]);
    return { ...money, cards: cards?.account?.paymentMethods ?? [] };
  }, [id]);
  if (!ws) return html`<p>This workspace was not found, or you do not have access to it.</p>`;
  if (q.error) return html`<${ErrorBox} error=${q.error} />`;
  if (!q.data) return html`<${Loading} />`;
  const { creditPackages, workspace, cards } = q.data;
  const admin = ctx.workspaceAdmin(id);
  const targets = ws.account.workspaces.filter((t) => t.id !== id && ctx.workspaceAdmin(t.id));
  return html`<div data-testid="money" data-admin=${admin ? 'yes' : 'no'}>
    ${admin
      ? html`<${BuyCredits} ws=${workspace} packages=${creditPackages} cards=${cards} canPickCard=${cardsAllowed} />
          <${TransferForm} ws=${workspace} targets=${targets} />`
      : html`<p class="notice" data-testid="read-only">Your role in this workspace is ${ctx.workspaceRole(id) ?? 'none'}: you can see its money settings, and a workspace admin can change them.</p>`}
    <${AutoReloadCard} ws=${workspace} cards=${cards} admin=${admin} cardsAllowed=${cardsAllowed} onSaved=${q.reload} />
    <${AlertsCard} ws=${workspace} admin=${admin} onSaved=${q.reload} />
    ${cardsAllowed && html`<${CardsCard} accountId=${accountId} cards=${cards} onChanged=${q.reload} />`}
  </div>`;
}
