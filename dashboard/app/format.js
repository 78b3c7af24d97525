// Money and dates. Credits arrive as exact decimal strings ("1234.5", "-0.000001234");
// they are rounded to cents only for display, with BigInt (no float touches money).

const NANOS = 1_000_000_000n;

/** The exact amount in nanocredits (BigInt) of a Credits string. */
export function toNanos(credits) {
  const s = String(credits ?? '0').trim();
  const negative = s.startsWith('-');
  const [whole, frac = ''] = (negative ? s.slice(1) : s).split('.');
  const nanos = BigInt(whole || '0') * NANOS + BigInt((frac + '000000000').slice(0, 9));
  return negative ? -nanos : nanos;
}

/** A Credits string of nanocredits (normalised like the API: no trailing zeros). */
export function fromNanos(nanos) {
  const negative = nanos < 0n;
  const abs = negative ? -nanos : nanos;
  const frac = (abs % NANOS).toString().padStart(9, '0').replace(/0+$/, '');
  return `${negative ? '-' : ''}${abs / NANOS}${frac ? '.' + frac : ''}`;
}

/** "$1,234.56": rounded half away from zero to whole cents. */
export function dollars(credits) {
  const nanos = toNanos(credits);
  const negative = nanos < 0n;
  const abs = negative ? -nanos : nanos;
  const cents = (abs + 5_000_000n) / 10_000_000n;
  const whole = (cents / 100n).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ',');
  const sign = negative && cents > 0n ? '−' : '';
  return `${sign}$${whole}.${(cents % 100n).toString().padStart(2, '0')}`;
}

/** The exact amount, for the hover title. */
export function exact(credits) {
  return `${fromNanos(toNanos(credits))} credits (exact)`;
}

/** Credits as a float, for charts only. */
export function chartValue(credits) {
  return Number(toNanos(credits)) / 1e9;
}

export function addCredits(a, b) {
  return fromNanos(toNanos(a) + toNanos(b));
}

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
const dateOnly = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium' });
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: 'medium' });

/** A DateTime (UTC on the wire) in the browser's time zone. */
export function when(iso) {
  return iso ? dateTime.format(new Date(iso)) : '—';
}

export function day(iso) {
  return iso ? dateOnly.format(new Date(iso)) : '—';
}

export function clock(date) {
  return timeOnly.format(date);
}

/** Parses what a person typed as a dollar amount into a Credits string, or null. */
export function parseAmount(text) {
  const s = String(text).replace(/[$,\s]/g, '');
  return /^\d+(\.\d{1,2})?$/.test(s) ? s : null;
}

export function pct(part, whole) {
  const w = toNanos(whole);
  if (w <= 0n) return 0;
  const p = Number((toNanos(part) * 10000n) / w) / 100;
  return Math.max(0, Math.min(100, p));
}
