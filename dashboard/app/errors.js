// Errors in words. Every API error carries a stable `extensions.code`; people read the
// sentence, support reads the code (shown in small print).
import { dollars } from './format.js';

export class ApiError extends Error {
  constructor(code, message, extensions = {}) {
    super(message);
    this.code = code;
    this.extensions = extensions;
  }
}

const WORDS = {
  UNAUTHENTICATED: () => 'Your session has ended: the token is no longer valid. Sign in again.',
  FORBIDDEN: () => 'Your role does not allow this. Ask a workspace or account admin.',
  NOT_FOUND: () => 'This was not found, or you do not have access to it.',
  INSUFFICIENT_CREDITS: (e) =>
    `Not enough credits: the workspace has ${e.extensions.available ? dollars(e.extensions.available) : 'too little'} available. Buy credits or transfer some from another workspace.`,
  BUDGET_EXCEEDED: (e) =>
    `The project's budget for this period is used up${e.extensions.available ? ` (${dollars(e.extensions.available)} left)` : ''}. Raise the budget or wait for the next period.`,
  PAYMENT_FAILED: () =>
    'The payment could not be processed: the card processor did not answer. Nothing was charged; try again in a moment.',
  IDEMPOTENCY_CONFLICT: () => 'This request was already sent with different details. Reload and try again.',
  LIMIT_EXCEEDED: (e) => `A limit was reached: ${e.message}`,
  INVALID_INPUT: (e) => `Please check the form: ${e.message}`,
  INTERNAL: (e) => `Something went wrong on the server. ${e.message}`,
  NETWORK: () => 'The server could not be reached. Check the connection and try again.',
};

/** The sentence to show for an error. */
export function explain(error) {
  const code = error?.code ?? 'INTERNAL';
  const words = WORDS[code];
  return words ? words(error) : error?.message ?? String(error);
}

/** Words for a failed purchase's `failureReason` (a gateway decline code). */
export function explainDecline(reason) {
  const known = {
    card_declined: 'The card was declined by its bank.',
    insufficient_funds: 'The card was declined: insufficient funds.',
    expired_card: 'The card has expired.',
    authentication_required: 'The bank asks the card holder to confirm this payment (3-D Secure).',
  };
  return known[reason] ?? `The payment failed (${reason ?? 'no reason given'}).`;
}
