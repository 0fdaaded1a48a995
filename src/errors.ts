/**
 * The error thrown for bad input (a wrong argument, option or layer
 * setting), so that callers can tell it from a GPU or runtime failure.
 */

/** A short rendering of a user value for error messages. */
export function describeValue(value: unknown): string {
  if (Array.isArray(value)) {
    return `[${value.map(describeValue).join(', ')}]`;
  }
  if (typeof value === 'string') {
    return JSON.stringify(value);
  }
  if (value != null && typeof value === 'object') {
    const name = (value as object).constructor?.name;
    return name != null && name !== 'Object' ? `a ${name}` : 'an object';
  }
  return String(value);
}

export class FlashAttentionError extends Error {
  /**
   * @param opName the op, layer or loader that rejected the input
   * @param argument the argument or option at fault (e.g. `causal`, `q`)
   * @param expected what it must be
   * @param actual what it was, as rendered for the message
   * @param message the full message; built from the fields when absent
   */
  constructor(
      readonly opName: string, readonly argument: string, readonly expected: string,
      readonly actual: string, message?: string) {
    super(message ?? `${opName}: ${argument} must be ${expected}, got ${actual}`);
    this.name = 'FlashAttentionError';
    Object.setPrototypeOf(this, FlashAttentionError.prototype);
  }
}

/** Throws a FlashAttentionError for `argument`, rendering `value`. */
export function invalidArgument(
    opName: string, argument: string, expected: string, value: unknown): never {
  throw new FlashAttentionError(opName, argument, expected, describeValue(value));
}
