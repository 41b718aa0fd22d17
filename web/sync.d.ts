// Types of sync.js (hand-written; the module itself carries the same as JSDoc).

export const PROTOCOL_VERSION: 1;

export interface Envelope {
  v?: number;
  op: string;
  target?: string;
  inbox?: string;
  data?: any;
}

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed" | "unauthorized";
export type StoreState = "connecting" | "loading" | "synced" | "error";
export type StreamState = "connecting" | "loading" | "live" | "error";
export type SubscriptionStatus =
  | "idle"
  | "pending"
  | "active"
  | "revoked"
  | "denied"
  | "failed"
  | "closed";

export interface ServerError {
  code: string;
  reason: string;
}

export interface Capabilities {
  subjects?: string[];
  buckets?: Record<string, string[]>;
  streams?: Record<string, string[]>;
  commands?: string[];
}

export interface BackoffOptions {
  /** ms before the first retry (default 250) */
  initial?: number;
  /** cap in ms (default 10000) */
  max?: number;
  /** growth per attempt (default 2) */
  factor?: number;
  /** fraction of the delay that is random (default 0.5) */
  jitter?: number;
}

// ---------------------------------------------------------------- pure parts

export function splitFrame(frame: string, onBad?: (line: string, error: unknown) => void): Envelope[];
export function validPattern(pattern: string): boolean;
export function match(pattern: string, subject: string): boolean;
export function isSubset(pattern: string, of: string): boolean;
export function allows(
  caps: Capabilities | null | undefined,
  op: "sub" | "kv_sub" | "js_sub" | "cmd",
  target: string,
  pattern?: string,
): boolean;

export interface Routable {
  op: string;
  target: string;
  pattern: string;
  inbox: string | null;
}
export function recipients<S extends Routable>(env: Envelope, subs: Iterable<S>): S[];
export function backoffDelay(attempt: number, opts?: BackoffOptions, random?: () => number): number;

export interface KvChange<V = any> {
  key: string;
  op: "put" | "delete";
  value?: V;
  previous?: V;
  revision: number;
}

export type Decode<V> = (value: any, meta: { key: string; revision: number }) => V;

export class KvBook<V = any> {
  constructor(decode?: Decode<V>);
  values: Map<string, V>;
  revs: Map<string, number>;
  revision: number;
  synced: boolean;
  everSynced: boolean;
  seen: Set<string> | null;
  dropUnseen: boolean;
  begin(useSince?: boolean): number | undefined;
  ok(data: { position?: number; recovered?: boolean }, resumed: boolean): void;
  apply(d: { key: string; op: string; revision: number; value?: any; value_b64?: string }): KvChange<V> | null;
  markSynced(revision: number): KvChange<V>[];
  clear(): KvChange<V>[];
}

export interface StreamOptions {
  filter?: string;
  startSeq?: number;
  /** seconds back */
  timeDelta?: number;
  /** RFC 3339 */
  startTime?: string;
  batch?: number;
  /** explicit acks: a message is acked once its handlers are done (at-least-once) */
  ack?: boolean;
  /**
   * a durable: its position is kept on the server (any tab, any gateway resumes it). The
   * start options count only when it is created; a re-subscription resumes after its floor.
   */
  durable?: string;
}

/** The `ok` of a js_sub. */
export interface StreamOk {
  /** the first seq it delivers (a resumed durable's redeliveries included) */
  position?: number;
  /** false: the resume point is gone (purged, stream recreated, durable deleted or expired) */
  recovered?: boolean;
  /** with a durable: made now, or taken over where it stood */
  durable?: "created" | "resumed";
}

/**
 * What a js_sub's `ok` means for the app (also the argument of a stream's `reset`/`gap`):
 * either one means the app must reload its state.
 */
export interface ResumeReport {
  /** the stream was recreated: seqs start again */
  reset: boolean;
  /** messages not yet seen are gone (purged; or the durable was deleted or expired) */
  gap: boolean;
  /** the seq a resume asked for, null when it was no resume */
  expected: number | null;
  position: number;
}

export class StreamBook {
  constructor(opts?: StreamOptions);
  opts: StreamOptions;
  lastSeq: number;
  next: number | null;
  /** whether the subscription being sent is a resume (an `ok` came before) */
  resumed: boolean;
  /** the js_sub `data`: start options the first time; then start_seq, or a durable alone */
  request(): Record<string, any>;
  ok(data: StreamOk): ResumeReport;
  accept(seq: number): boolean;
}

// ---------------------------------------------------------------- transports (pure parts)

export type TransportKind = "websocket" | "polling";

export interface FallbackOptions {
  /** WebSocket attempts in a row that never became a session before polling (default 3) */
  fallbackAfter?: number;
  /** ms between WebSocket tries while on polling (default 60000; 0: never) */
  probeInterval?: number;
  /** ms before the first of them (default 5000, at most probeInterval) */
  firstProbe?: number;
  /** false: WebSocket only, never poll (default true) */
  polling?: boolean;
}

/** The fallback decision: which transport the next attempt uses. */
export class TransportPolicy {
  constructor(opts?: FallbackOptions);
  fallbackAfter: number;
  probeInterval: number;
  firstProbe: number;
  enabled: boolean;
  /** the transport of the next attempt */
  mode: TransportKind;
  wsFailures: number;
  pollFailures: number;
  preferPolling(): void;
  /** an attempt that never became a session (not for 4401/4403) */
  failed(kind: TransportKind): void;
  connected(kind: TransportKind): void;
  /** should a WebSocket be tried beside a session over `kind`? */
  probes(kind: TransportKind): boolean;
  /** ms before WebSocket try `n` (0 = the first) of a polling session, jittered */
  probeDelay(n: number, random?: () => number): number;
}

/** Long-poll bookkeeping: `after` moves only once a whole answer was read. */
export class PollCursor {
  after: number;
  query(sid: string, wait: number): string;
  /** the text to hand over ("" when nothing new), or null for an answer to fetch again */
  accept(lastFrame: string | null, body: string): string | null;
}

/** What a long-polling HTTP answer means, as a WebSocket close would. */
export function pollOutcome(
  status: number,
  problem?: any,
): { retry: true; code?: undefined; reason: string } | { retry: false; code: number; reason: string };
export function newSid(): string;
/** `ws://h/ws` → `http://h/poll` */
export function pollUrlFor(wsUrl: string): string;

/** What carries one session. */
export interface Transport {
  readonly kind: TransportKind;
  send(text: string): boolean;
  close(code?: number, reason?: string): void;
  detach(): void;
  onopen: (() => void) | null;
  onmessage: ((text: string) => void) | null;
  onclose: ((code: number, reason: string) => void) | null;
}

export class WebSocketTransport implements Transport {
  constructor(WS: any, url: string);
  readonly kind: "websocket";
  send(text: string): boolean;
  close(code?: number, reason?: string): void;
  detach(): void;
  onopen: (() => void) | null;
  onmessage: ((text: string) => void) | null;
  onclose: ((code: number, reason: string) => void) | null;
}

export interface PollingOptions {
  fetch?: typeof fetch;
  /** seconds the server may hold a GET (default 25) */
  wait?: number;
  /** failed GETs in a row (network, 5xx) retried before the session counts as lost (default 3) */
  retries?: number;
  /** ms before the first retry, doubling (default 250) */
  retryDelay?: number;
  sid?: string;
}

export class PollingTransport implements Transport {
  constructor(url: string, opts?: PollingOptions);
  readonly kind: "polling";
  readonly url: string;
  readonly sid: string;
  readonly cursor: PollCursor;
  readonly state: "opening" | "open" | "closed";
  send(text: string): boolean;
  close(code?: number, reason?: string): void;
  detach(): void;
  onopen: (() => void) | null;
  onmessage: ((text: string) => void) | null;
  onclose: ((code: number, reason: string) => void) | null;
}

// ---------------------------------------------------------------- client

export class SyncError extends Error {
  constructor(code: string, reason: string);
  code: string;
  reason: string;
}

type Off = () => void;

declare class Subscription {
  readonly client: SyncClient;
  readonly op: "sub" | "kv_sub" | "js_sub";
  readonly target: string;
  readonly pattern: string;
  readonly inbox: string | null;
  readonly status: SubscriptionStatus;
  readonly error: ServerError | null;
  readonly revoked: boolean;
  on(event: "revoked", fn: (error: ServerError) => void): Off;
  on(event: "error", fn: (error: ServerError) => void): Off;
  on(event: "closed", fn: () => void): Off;
  close(): void;
}

export class CoreSubscription extends Subscription {
  on(event: "message", fn: (payload: any, msg: { subject: string; envelope: Envelope }) => void): Off;
  on(event: "revoked" | "error", fn: (error: ServerError) => void): Off;
  on(event: "closed", fn: () => void): Off;
}

export interface KvOptions<V> {
  /** key pattern (default `>`) */
  pattern?: string;
  decode?: Decode<V>;
  /** after a reconnect: `since` (default) passes since_revision; `resync` reloads and drops */
  resume?: "since" | "resync";
  onRevoked?: (error: ServerError) => void;
}

export class KvStore<V = any> extends Subscription {
  readonly state: StoreState;
  readonly revision: number;
  readonly values: Map<string, V>;
  readonly book: KvBook<V>;
  get(key: string): V | undefined;
  /** the KV revision of a key's current value (for If-Match) */
  revisionOf(key: string): number | undefined;
  /** resolves once the store is synced and has seen `revision` */
  seen(revision: number, opts?: { timeout?: number }): Promise<number>;
  on(event: "change", fn: (changes: KvChange<V>[]) => void): Off;
  on(event: "state", fn: (state: StoreState) => void): Off;
  on(event: "revoked" | "error", fn: (error: ServerError) => void): Off;
  on(event: "closed", fn: () => void): Off;
}

export interface StreamMessage<P = any> {
  seq: number;
  subject: string;
  payload: P;
  time: string;
}

export interface StreamSubscriptionOptions<P> extends StreamOptions {
  /**
   * may return a promise: with `ack`, the message is acked once it resolves; if it rejects,
   * the message is not acked, and handed on again when the server sends it again
   */
  onMessage?: (m: StreamMessage<P>) => unknown;
  onRevoked?: (error: ServerError) => void;
}

export interface StreamCloseOptions {
  /** also delete the stream's durable on the server (`unsub` with `delete_durable`) */
  deleteDurable?: boolean;
}

/**
 * A JetStream subscription, de-duplicated by seq (also across reconnects). A durable one
 * taken over by a newer subscription (another tab or device) ends: `error` event with code
 * `taken_over`, status `failed`, never re-subscribed by the client (close it and open a new
 * stream to take it back).
 */
export class StreamSubscription<P = any> extends Subscription {
  readonly state: StreamState;
  /** the last seq delivered to the app */
  readonly lastSeq: number;
  readonly ack: boolean;
  readonly durable: string | null;
  readonly book: StreamBook;
  /** resolves once the message with this seq (or a later one) was delivered */
  seen(seq: number, opts?: { timeout?: number }): Promise<number>;
  /**
   * End the stream (idempotent; resolves at once). With `deleteDurable` its durable is
   * deleted too: resolves once the server confirmed it; rejects with a SyncError when it
   * could not be (`bad_request`: no durable; `taken_over`, `revoked`, `closed`: not held
   * here; `unavailable`: the connection was lost before the answer, it may or may not be
   * deleted). While reconnecting, the delete is sent once the stream is subscribed again.
   */
  close(opts?: StreamCloseOptions): Promise<void>;
  on(event: "message", fn: (m: StreamMessage<P>) => unknown): Off;
  on(event: "state", fn: (state: StreamState) => void): Off;
  /** the resume could not be honoured: reload the app's state */
  on(event: "reset" | "gap", fn: (r: ResumeReport) => void): Off;
  /** `error`: e.g. `taken_over` (final) */
  on(event: "revoked" | "error", fn: (error: ServerError) => void): Off;
  on(event: "closed", fn: () => void): Off;
}

export interface ClientOptions extends FallbackOptions {
  /** default: ws(s)://<page host>/ws */
  url?: string;
  /** a WebSocket constructor (tests) */
  WebSocket?: any;
  backoff?: BackoffOptions;
  /** ms between client pings (default 20000) */
  pingInterval?: number;
  /** ms of silence after a ping interval before the connection counts as dead (default 10000) */
  pongTimeout?: number;
  /** ms a connection must live before the backoff starts over (default 5000) */
  stableAfter?: number;
  /** e.g. `() => api.post("/auth/refresh")`: renews the cookie (and returns the token) */
  refresh?: () => Promise<{ token: string; expires_at?: number }>;
  /** the token's expiry (Unix seconds): refreshed `refreshBefore` seconds earlier */
  expiresAt?: number;
  refreshBefore?: number;
  /** after this many failed upgrades in a row, ask `refresh` whether we are still logged in */
  authCheckAfter?: number;
  /** false: do not connect in the constructor */
  connect?: boolean;
  random?: () => number;
  /** ms a WebSocket try may take to get its cap_update (default 10000) */
  probeTimeout?: number;
  /** the transport of the first attempt (default "websocket") */
  transport?: TransportKind;
  /** default: the `url` with http(s) and `/poll` */
  pollUrl?: string;
  /** seconds the server may hold a poll (default 25) */
  pollWait?: number;
  /** for the polling transport (tests) */
  fetch?: typeof fetch;
}

export interface StateDetails {
  code?: number;
  reason?: string;
  error?: ServerError | null;
  retryIn?: number;
  connects?: number;
  /** with "open": the transport the session runs over */
  transport?: TransportKind;
}

export class SyncClient {
  constructor(options?: ClientOptions);
  readonly url: string;
  readonly pollUrl: string;
  readonly state: ConnectionState;
  /** the transport of the session in use (or of the first attempt, before any) */
  readonly transport: TransportKind;
  /** the fallback decision, live: e.g. `policy.mode` is the next attempt's transport */
  readonly policy: TransportPolicy;
  readonly user: string | null;
  readonly capabilities: Capabilities | null;
  readonly attempt: number;
  /** connections that got their first cap_update */
  readonly connects: number;
  readonly retryIn: number | null;
  kv<V = any>(bucket: string, opts?: KvOptions<V>): KvStore<V>;
  subscribe(
    subject: string,
    handler?: (payload: any, msg: { subject: string; envelope: Envelope }) => void,
  ): CoreSubscription;
  stream<P = any>(name: string, opts?: StreamSubscriptionOptions<P>): StreamSubscription<P>;
  allows(op: "sub" | "kv_sub" | "js_sub" | "cmd", target: string, pattern?: string): boolean;
  reconnect(): void;
  /** on polling: try a WebSocket now (as the periodic try does); false if nothing to try */
  retryWebSocket(): boolean;
  close(): void;
  on(event: "state", fn: (state: ConnectionState, details: StateDetails) => void): Off;
  /** the session moved to another transport (fallback, or back to WebSocket) */
  on(event: "transport", fn: (transport: TransportKind, details: { previous: TransportKind }) => void): Off;
  on(
    event: "capabilities",
    fn: (caps: Capabilities, revoked: Array<KvStore | StreamSubscription | CoreSubscription>) => void,
  ): Off;
  on(event: "error", fn: (error: ServerError) => void): Off;
}

export function createClient(options?: ClientOptions): SyncClient;

// ---------------------------------------------------------------- HTTP

export class ApiError extends Error {
  constructor(status: number, problem: Record<string, any>);
  /** 0 for a network failure */
  status: number;
  type: string;
  title: string;
  detail: string;
  problem: Record<string, any>;
}

export interface RequestOptions {
  json?: any;
  /** a revision (sent as a strong ETag `"N"`) or an ETag */
  ifMatch?: number | string;
  headers?: Record<string, string>;
  idempotencyKey?: string;
  signal?: AbortSignal;
}

export interface ApiResponse {
  status: number;
  etag: string | null;
  location: string | null;
  headers: Headers;
  body: any;
}

export interface Api {
  request(method: string, path: string, opts?: RequestOptions): Promise<ApiResponse>;
  get(path: string, opts?: RequestOptions): Promise<any>;
  post(path: string, json?: any, opts?: RequestOptions): Promise<any>;
  put(path: string, json?: any, opts?: RequestOptions): Promise<any>;
  del(path: string, opts?: RequestOptions): Promise<any>;
}

export function createApi(opts?: { base?: string; fetch?: typeof fetch }): Api;
