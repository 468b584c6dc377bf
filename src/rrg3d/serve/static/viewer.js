/* rrg3d web page: upload a CT, follow its job, show the scan in NiiVue and the report beside it.
 *
 * Plain ES2020, no build step, nothing loaded from outside the server. NiiVue (BSD-2-Clause) is the UMD bundle
 * served at static/niivue.umd.js (global `niivue`); when the server has none (404) the page still works and says
 * how to install it. API: POST v1/studies, GET v1/studies/{id} (polled), .../volume, .../regions, .../fhir,
 * .../sr, DELETE v1/studies/{id}; a 401 asks for a bearer token, kept in sessionStorage.
 *
 * For tests: window.rrg3d = {state, studyId, viewerReady, activeRegion, job, showRegion(name)}.
 */
'use strict';

(() => {
  const TOKEN_KEY = 'rrg3d.token';
  const POLL_MS = 1000;
  const MAX_RETRY_MS = 15000;
  const INSTALL_COMMAND = 'python -m rrg3d.serve.assets';
  const ACCEPTED = /\.(nii|nii\.gz|zip)$/i;
  /** CT windows as [width, level] in HU. */
  const WINDOWS = {lung: [1500, -600], mediastinum: [350, 40], bone: [2000, 500]};
  /** NiiVue SLICE_TYPE values. */
  const VIEWS = {axial: 0, coronal: 1, sagittal: 2, multiplanar: 3, render: 4};
  /** Region colours by label value (1-based), distinguishable on grey. */
  const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]];
  const OVERLAY_OPACITY = 0.6;
  const SECTION_TITLES = {other: '', findings: 'Findings', impression: 'Impression'};

  const $ = (id) => document.getElementById(id);
  const els = {
    auth: $('auth'), authForm: $('auth-form'), tokenInput: $('token-input'), authMessage: $('auth-message'),
    drop: $('drop-zone'), input: $('file-input'), status: $('status'), progress: $('progress'),
    canvas: $('viewer'), notice: $('viewer-notice'), report: $('report'),
    fhir: $('download-fhir'), sr: $('download-sr'), remove: $('delete-study'), model: $('model-info'),
  };

  const app = {
    state: 'idle', studyId: null, viewerReady: false, activeRegion: null, job: null, error: null,
    showRegion, setWindow: applyWindow, setView: applyView,
  };
  Object.defineProperty(app, 'niivue', {get: () => nv}); // the Niivue instance (null until it runs)
  window.rrg3d = app;

  let lib = null; // the NiiVue module (window.niivue)
  let nv = null; // the Niivue instance on #viewer
  let viewerPromise = null; // resolves to nv, or null when the viewer cannot run
  let generation = 0; // bumped whenever the shown study changes: older loops and loads stop
  let currentWindow = 'mediastinum';
  let currentView = 'multiplanar';
  let volumePromise = null;
  let regionsPromise = null;
  let tokenWaiters = [];
  let viewerMissing = false; // set when the viewer cannot run: region sentences are then plain text

  class ApiError extends Error {
    constructor(status, message, retryAfter = null) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  // -- small helpers -------------------------------------------------------------------------------------------
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const absolute = (path) => new URL(path, document.baseURI).href;
  const studyPath = (id, tail = '') => `v1/studies/${encodeURIComponent(id)}${tail}`;

  function sentenceCase(text) {
    const s = String(text).trim();
    return s ? s[0].toUpperCase() + s.slice(1) : s;
  }

  function element(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === 'class') node.className = value;
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key === 'style') Object.assign(node.style, value);
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function setState(state) {
    app.state = state;
    els.status.dataset.state = state;
    document.body.dataset.state = state;
    els.drop.classList.toggle('busy', state === 'uploading');
  }

  function setStatus(text, kind = null) {
    els.status.textContent = text;
    if (kind) els.status.dataset.state = kind;
  }

  function setProgress(fraction) {
    if (fraction === null || fraction === undefined) {
      els.progress.hidden = true;
      return;
    }
    els.progress.hidden = false;
    if (Number.isFinite(fraction)) els.progress.value = Math.max(0, Math.min(1, fraction));
    else els.progress.removeAttribute('value'); // indeterminate
  }

  // -- auth ----------------------------------------------------------------------------------------------------
  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || '';
    } catch {
      return '';
    }
  }

  function authHeaders() {
    const value = token();
    return value ? {Authorization: `Bearer ${value}`} : {};
  }

  /** Show the token field; resolves when the user has entered a token. */
  function askForToken(refused) {
    if (refused) {
      try {
        sessionStorage.removeItem(TOKEN_KEY);
      } catch { /* storage disabled */ }
    }
    els.auth.hidden = false;
    els.authMessage.textContent = refused ? 'The server refused that token; enter it again.' : '';
    els.tokenInput.focus();
    return new Promise((resolve) => tokenWaiters.push(resolve));
  }

  els.authForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const value = els.tokenInput.value.trim();
    if (!value) return;
    try {
      sessionStorage.setItem(TOKEN_KEY, value);
    } catch {
      els.authMessage.textContent = 'This browser does not allow session storage; the token cannot be kept.';
      return;
    }
    els.tokenInput.value = '';
    els.auth.hidden = true;
    els.authMessage.textContent = '';
    const waiters = tokenWaiters;
    tokenWaiters = [];
    waiters.forEach((resolve) => resolve());
  });

  // -- API -----------------------------------------------------------------------------------------------------
  function detailText(body) {
    const detail = body && typeof body === 'object' ? body.detail : null;
    if (typeof detail === 'string') return detail;
    if (Array.isArray(detail)) return detail.map((item) => (item && item.msg) || JSON.stringify(item)).join('; ');
    if (detail) return JSON.stringify(detail);
    return '';
  }

  function errorFor(status, body, retryAfter) {
    const detail = sentenceCase(detailText(body));
    let message;
    if (status === 413) message = `The file is too large for this server. ${detail}`;
    else if (status === 429) {
      const seconds = Number.parseInt(retryAfter || '', 10);
      const when = Number.isFinite(seconds) ? `in ${seconds} s` : 'later';
      message = `The server's queue is full; try again ${when}. ${detail}`;
    } else if (status === 400) message = `The server cannot read this file. ${detail}`;
    else message = detail || `The server answered ${status}.`;
    return new ApiError(status, message.trim(), retryAfter);
  }

  async function api(path, options = {}) {
    for (;;) {
      const hadToken = Boolean(token());
      let response;
      try {
        response = await fetch(path, {...options, headers: {...authHeaders(), ...(options.headers || {})}});
      } catch {
        throw new ApiError(0, 'The server could not be reached.');
      }
      if (response.status === 401) {
        await askForToken(hadToken);
        continue;
      }
      if (!response.ok) {
        let body = null;
        try {
          body = await response.json();
        } catch { /* not JSON */ }
        throw errorFor(response.status, body, response.headers.get('Retry-After'));
      }
      return response;
    }
  }

  function sendUpload(file) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open('POST', 'v1/studies');
      for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
      xhr.upload.addEventListener('progress', (event) => {
        if (event.lengthComputable && event.total > 0) setProgress(event.loaded / event.total);
      });
      xhr.addEventListener('load', () => resolve(xhr));
      xhr.addEventListener('error', () => {
        reject(new ApiError(0, 'The upload failed: the server could not be reached.'));
      });
      xhr.addEventListener('abort', () => reject(new ApiError(0, 'The upload was cancelled.')));
      const form = new FormData();
      form.append('file', file, file.name);
      xhr.send(form);
    });
  }

  async function upload(file) {
    for (;;) {
      const hadToken = Boolean(token());
      const xhr = await sendUpload(file);
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch { /* not JSON */ }
      if (xhr.status === 401) {
        setStatus('Enter the access token to upload.');
        await askForToken(hadToken);
        setStatus(`Uploading ${file.name}…`);
        continue;
      }
      if (xhr.status < 200 || xhr.status >= 300) {
        throw errorFor(xhr.status, body, xhr.getResponseHeader('Retry-After'));
      }
      if (!body || typeof body.id !== 'string') throw new ApiError(xhr.status, 'The server gave no study id.');
      return body;
    }
  }

  // -- studies -------------------------------------------------------------------------------------------------
  function resetStudy() {
    app.studyId = null;
    app.job = null;
    app.error = null;
    app.viewerReady = false;
    app.activeRegion = null;
    volumePromise = null;
    regionsPromise = null;
    els.report.replaceChildren(element('p', {class: 'placeholder'},
      'The generated report appears here when the scan has been read.'));
    for (const button of [els.fhir, els.sr, els.remove]) button.disabled = true;
    if (nv) {
      while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
      nv.drawScene();
    }
  }

  function failStudy(message, gen) {
    if (gen !== generation) return;
    app.error = message;
    setState('failed');
    setStatus(message);
    setProgress(null);
    els.remove.disabled = !app.studyId;
  }

  async function handleFile(file) {
    if (!file) return;
    if (!ACCEPTED.test(file.name)) {
      setStatus(`${file.name} is not a .nii, .nii.gz or .zip file.`, 'error');
      return;
    }
    if (app.state === 'uploading') return;
    const gen = ++generation;
    resetStudy();
    setState('uploading');
    setStatus(`Uploading ${file.name}…`);
    setProgress(0);
    let answer;
    try {
      answer = await upload(file);
    } catch (error) {
      failStudy(error.message, gen);
      return;
    }
    if (gen !== generation) return;
    openStudy(answer.id, answer.status || 'queued', gen);
  }

  function openStudy(id, status, gen) {
    app.studyId = id;
    history.replaceState(null, '', `#study=${encodeURIComponent(id)}`);
    setState(status === 'running' ? 'running' : 'queued');
    setStatus('Waiting for the server…');
    setProgress(0);
    els.remove.disabled = false;
    poll(id, gen);
  }

  function describeProgress(job) {
    const percent = Math.round(100 * (Number(job.progress) || 0));
    if (job.status === 'queued') return 'Queued: waiting for the model…';
    const stage = job.stage ? sentenceCase(String(job.stage).replace(/_/g, ' ')) : 'Working';
    return `${stage}… ${percent}%`;
  }

  async function poll(id, gen) {
    let failures = 0;
    while (gen === generation) {
      let job;
      try {
        job = await (await api(studyPath(id))).json();
        failures = 0;
      } catch (error) {
        if (gen !== generation) return;
        if (error.status === 404) {
          failStudy('This study is not on the server (deleted, or the server was reset).', gen);
          return;
        }
        failures += 1;
        setStatus(`${error.message} Retrying…`);
        await sleep(Math.min(POLL_MS * 2 ** failures, MAX_RETRY_MS));
        continue;
      }
      if (gen !== generation) return;
      app.job = job;
      if (job.has_volume && !volumePromise) volumePromise = loadVolume(id, gen);
      if (job.status === 'done') {
        showResult(job, gen);
        return;
      }
      if (job.status === 'failed') {
        failStudy(sentenceCase(job.error || 'The report could not be generated.'), gen);
        return;
      }
      setState(job.status === 'running' ? 'running' : 'queued');
      setStatus(describeProgress(job));
      setProgress(job.status === 'queued' ? Number.NaN : Number(job.progress) || 0);
      await sleep(POLL_MS);
    }
  }

  function showResult(job, gen) {
    renderReport(job);
    for (const button of [els.fhir, els.sr, els.remove]) button.disabled = false;
    setProgress(null);
    const grounded = !viewerMissing && regionNames(job).some((name) => labelValues(job, name) !== null);
    setStatus(grounded ? 'Report ready. Click a region to show it on the scan.'
      : 'Report ready.');
    setState('done');
    if (!volumePromise) volumePromise = loadVolume(job.id || app.studyId, gen);
  }

  // -- report --------------------------------------------------------------------------------------------------
  function splitSections(text) {
    const pattern = /(^|\n|\s)(findings|impression)\s*:/gi;
    const hits = [...text.matchAll(pattern)];
    if (!hits.length) return text.trim() ? {findings: text.trim()} : {};
    const sections = {};
    const add = (name, body) => {
      const clean = body.trim();
      if (clean) sections[name] = sections[name] ? `${sections[name]} ${clean}` : clean;
    };
    add('other', text.slice(0, hits[0].index));
    hits.forEach((hit, i) => {
      const start = hit.index + hit[0].length;
      const stop = i + 1 < hits.length ? hits[i + 1].index : text.length;
      add(hit[2].toLowerCase(), text.slice(start, stop));
    });
    return sections;
  }

  function splitSentences(text) {
    return String(text).trim().split(/(?<=[.!?])\s+(?=[A-Z0-9(])/).filter((s) => s.trim());
  }

  /**
   * The regions to list: every region of the label map (`regions`, in label order), then any region the model
   * wrote about that the map does not name. Links exist for each, whether or not the model wrote a sentence.
   */
  function regionNames(job) {
    const mapped = Object.entries(job.regions || {})
      .map(([name, value]) => [name, Math.min(...[].concat(value).map(Number).filter(Number.isFinite))])
      .sort((a, b) => (a[1] - b[1]) || a[0].localeCompare(b[0]))
      .map(([name]) => name);
    const written = Object.keys(job.region_reports || {}).filter((name) => !mapped.includes(name));
    return [...mapped, ...written];
  }

  function regionText(job, name) {
    const text = job.region_reports ? job.region_reports[name] : null;
    return typeof text === 'string' ? text.trim() : '';
  }

  /** Label values of a region in the label map, or null when the map has none for it. */
  function labelValues(job, name) {
    if (!job || !job.has_regions) return null;
    const raw = job.regions ? job.regions[name] : undefined;
    let values = [];
    if (Array.isArray(raw)) values = raw.map(Number);
    else if (raw !== undefined && raw !== null) values = [Number(raw)];
    else if (job.region_labels) {
      values = Object.entries(job.region_labels).filter(([, region]) => region === name).map(([v]) => Number(v));
    }
    values = values.filter((v) => Number.isFinite(v) && v > 0);
    return values.length ? values : null;
  }

  function regionColour(values) {
    const rgb = PALETTE[(values[0] - 1) % PALETTE.length];
    return `rgb(${rgb.join(' ')})`;
  }

  /** The finding classifier's calls and its probabilities (highest first) under a disclosure. */
  function classifierNodes(classifier) {
    const called = Array.isArray(classifier.called) ? classifier.called.map(String) : [];
    const threshold = Number(classifier.threshold);
    const limit = Number.isFinite(threshold) ? ` (threshold ${threshold.toFixed(2)})` : '';
    const nodes = [element('h3', {}, 'Finding classifier'),
      element('p', {class: 'classifier-called'},
        called.length ? `Called: ${called.join(', ')}${limit}.` : `Nothing called${limit}.`)];
    const probabilities = Object.entries(classifier.probabilities || {})
      .map(([label, p]) => [label, Number(p)]).filter(([, p]) => Number.isFinite(p)).sort((a, b) => b[1] - a[1]);
    if (probabilities.length) {
      const table = element('table', {class: 'classifier-table'},
        element('thead', {}, element('tr', {}, element('th', {scope: 'col'}, 'Finding'),
          element('th', {scope: 'col'}, 'Probability'))),
        element('tbody', {}, ...probabilities.map(([label, p]) => element('tr',
          {class: called.includes(label) ? 'called' : ''},
          element('th', {scope: 'row'}, label), element('td', {}, p.toFixed(2))))));
      nodes.push(element('details', {class: 'classifier'}, element('summary', {}, 'Probabilities'), table));
    }
    return nodes;
  }

  function renderReport(job) {
    const nodes = [];
    const given = job.sections && Object.keys(job.sections).length ? job.sections : null;
    const sections = given || splitSections(job.report || '');
    const names = Object.keys(sections);
    for (const name of names) {
      const title = name in SECTION_TITLES ? SECTION_TITLES[name] : sentenceCase(name);
      if (title && (names.length > 1 || name !== 'findings' || /findings\s*:/i.test(job.report || ''))) {
        nodes.push(element('h3', {}, title));
      }
      nodes.push(element('p', {class: `section section-${name}`}, sections[name]));
    }
    if (!names.length) nodes.push(element('p', {class: 'placeholder'}, 'The model wrote no report for this scan.'));

    const regions = regionNames(job);
    const regionLink = (name, text, extra = '') => element('a', {
      class: `region-link${extra}`, href: `#region-${encodeURIComponent(name)}`, dataset: {region: name},
      title: `Show the ${name} region on the scan`,
      onclick: (event) => {
        event.preventDefault();
        showRegion(name).catch((error) => setStatus(error.message, 'error'));
      },
    }, text);
    if (regions.length) {
      nodes.push(element('h3', {id: 'regions-heading'}, 'By region'));
      const list = element('ul', {class: 'region-list', 'aria-labelledby': 'regions-heading'});
      for (const name of regions) {
        const values = viewerMissing ? null : labelValues(job, name);
        const item = element('li', {dataset: {region: name}});
        if (values) item.style.setProperty('--region-colour', regionColour(values));
        const swatch = values ? element('span', {class: 'swatch', 'aria-hidden': 'true'}) : null;
        const title = values ? regionLink(name, sentenceCase(name), ' region-title')
          : element('span', {class: 'region-plain'}, sentenceCase(name));
        item.append(element('div', {class: 'region-name'}, swatch, title));
        const said = regionText(job, name);
        if (said) {
          const text = element('p', {class: 'region-text'});
          splitSentences(said).forEach((sentence, i) => {
            if (i) text.append(' ');
            text.append(values ? regionLink(name, sentence, ' region-sentence')
              : element('span', {class: 'region-plain'}, sentence));
          });
          item.append(text);
        } else {
          item.classList.add('silent');
          item.append(element('p', {class: 'region-text muted'}, 'No sentence for this region.'));
        }
        list.append(item);
      }
      nodes.push(list);
    }
    const classifier = job.findings_classifier;
    if (classifier && typeof classifier === 'object') nodes.push(...classifierNodes(classifier));
    const model = job.model && job.model.model;
    const seconds = job.started && job.finished ? (job.finished - job.started).toFixed(1) : null;
    if (model || seconds) {
      const parts = [model ? `Model: ${model}` : null, seconds ? `${seconds} s` : null].filter(Boolean);
      nodes.push(element('p', {class: 'meta'}, parts.join(' · ')));
    }
    els.report.replaceChildren(...nodes);
  }

  // -- viewer --------------------------------------------------------------------------------------------------
  function showViewerNotice(title, detail = null) {
    const children = [element('strong', {}, title)];
    if (detail) children.push(detail);
    const nodes = children.map((child) => (typeof child === 'string' ? element('p', {}, child) : child));
    els.notice.replaceChildren(...nodes);
    els.notice.hidden = false;
  }

  function loadBundle() {
    return new Promise((resolve) => {
      if (window.niivue && window.niivue.Niivue) {
        resolve(window.niivue);
        return;
      }
      const script = document.createElement('script');
      script.src = 'static/niivue.umd.js';
      script.async = true;
      script.addEventListener('load', () => resolve(window.niivue && window.niivue.Niivue ? window.niivue : null));
      script.addEventListener('error', () => resolve(null));
      document.head.append(script);
    });
  }

  /** The viewer cannot run: disable its controls and show the report's regions as plain text. */
  function viewerUnavailable() {
    viewerMissing = true;
    for (const button of document.querySelectorAll('button[data-view], button[data-window]')) button.disabled = true;
    if (app.job && app.job.status === 'done') {
      renderReport(app.job);
      if (app.state === 'done') setStatus('Report ready.');
    }
    return null;
  }

  async function startViewer() {
    lib = await loadBundle();
    if (!lib) {
      const install = element('p', {}, 'Install it with ', element('code', {}, INSTALL_COMMAND),
        ' on the server, then reload this page. Reports work without it.');
      showViewerNotice('The 3D viewer (NiiVue) is not installed on this server.', install);
      return viewerUnavailable();
    }
    if (!document.createElement('canvas').getContext('webgl2')) {
      showViewerNotice('This browser cannot show the viewer: it needs WebGL2.', 'Reports work without it.');
      return viewerUnavailable();
    }
    try {
      nv = new lib.Niivue({
        backColor: [0.15, 0.15, 0.15, 1],
        crosshairColor: [1, 0.82, 0.4, 0.85],
        show3Dcrosshair: true,
        dragAndDropEnabled: false,
        isColorbar: false,
        loadingText: 'Upload a scan to view it',
        logLevel: 'warn',
      });
      await nv.attachToCanvas(els.canvas);
      nv.setSliceType(VIEWS[currentView]);
    } catch (error) {
      nv = null;
      showViewerNotice('The viewer could not start.', String((error && error.message) || error));
      return viewerUnavailable();
    }
    if (lib.SHOW_RENDER) nv.opts.multiplanarShowRender = lib.SHOW_RENDER.ALWAYS;
    return nv;
  }

  async function loadVolume(id, gen) {
    const viewer = await viewerPromise;
    if (!viewer || gen !== generation) return;
    try {
      await viewer.loadVolumes([{
        url: absolute(studyPath(id, '/volume')), name: 'volume.nii.gz', headers: authHeaders(), colormap: 'gray',
      }]);
    } catch (error) {
      if (gen === generation) {
        showViewerNotice('The scan could not be shown.', String((error && error.message) || error));
      }
      return;
    }
    if (gen !== generation || !viewer.volumes.length) return;
    els.notice.hidden = true;
    applyWindow(currentWindow);
    app.viewerReady = true;
  }

  function pressed(attribute, value) {
    for (const button of document.querySelectorAll(`button[data-${attribute}]`)) {
      button.setAttribute('aria-pressed', String(button.dataset[attribute] === value));
    }
  }

  function applyWindow(name) {
    if (!(name in WINDOWS)) return;
    currentWindow = name;
    pressed('window', name);
    if (!nv || !nv.volumes.length) return;
    const [width, level] = WINDOWS[name];
    const volume = nv.volumes[0];
    volume.cal_min = level - width / 2;
    volume.cal_max = level + width / 2;
    nv.updateGLVolume();
  }

  function applyView(name) {
    if (!(name in VIEWS)) return;
    currentView = name;
    pressed('view', name);
    if (nv) nv.setSliceType(VIEWS[name]);
  }

  /** The study's region label map as an overlay (fetched once per study), with its original labels. */
  function regionOverlay(id, gen) {
    if (!regionsPromise) {
      regionsPromise = (async () => {
        const image = await lib.NVImage.loadFromUrl({
          url: absolute(studyPath(id, '/regions')), name: 'regions.nii.gz', headers: authHeaders(),
          colormap: 'red', opacity: OVERLAY_OPACITY,
        });
        if (gen !== generation) return null;
        const slope = Number(image.hdr.scl_slope) || 1;
        const inter = Number(image.hdr.scl_inter) || 0;
        const labels = new Float32Array(image.img.length);
        for (let i = 0; i < labels.length; i++) labels[i] = Math.round(image.img[i] * slope + inter);
        image.hdr.scl_slope = 1;
        image.hdr.scl_inter = 0;
        image.hdr.intent_code = 0; // a plain scalar mask from now on, drawn with our colormap (not a label atlas)
        image.img.fill(0);
        nv.addVolume(image);
        return {image, labels};
      })();
      regionsPromise.catch(() => {
        regionsPromise = null; // let a later click try again
      });
    }
    return regionsPromise;
  }

  /** Millimetre position of voxel (i, j, k) of `image` (NIfTI affine). */
  function voxelToMM(image, i, j, k) {
    const a = image.hdr.affine;
    return [0, 1, 2].map((r) => a[r][0] * i + a[r][1] * j + a[r][2] * k + a[r][3]);
  }

  /**
   * Show only region `name` of the label map as a coloured overlay and move the crosshair onto it.
   * Resolves to true when it is shown, false when the study has no label map (or no viewer) for it.
   */
  async function showRegion(name) {
    const job = app.job;
    const gen = generation;
    const values = labelValues(job, name);
    if (!job || job.status !== 'done' || !values) return false;
    const viewer = await viewerPromise;
    if (!viewer) return false;
    if (volumePromise) await volumePromise;
    if (!app.viewerReady || gen !== generation) return false;
    setStatus(`Loading the ${name} region…`);
    let overlay;
    try {
      overlay = await regionOverlay(app.studyId, gen);
    } catch (error) {
      throw new Error(`The region map could not be loaded: ${(error && error.message) || error}`);
    }
    if (!overlay || gen !== generation) return false;
    const {image, labels} = overlay;
    const wanted = new Set(values);
    const [nx, ny] = [image.hdr.dims[1], image.hdr.dims[2]];
    const img = image.img;
    let count = 0;
    let sx = 0;
    let sy = 0;
    let sz = 0;
    for (let index = 0; index < labels.length; index++) {
      const inside = wanted.has(labels[index]);
      img[index] = inside ? 1 : 0;
      if (inside) {
        count += 1;
        sx += index % nx;
        sy += Math.floor(index / nx) % ny;
        sz += Math.floor(index / (nx * ny));
      }
    }
    const rgb = PALETTE[(values[0] - 1) % PALETTE.length];
    const key = `rrg3d-region-${values[0]}`;
    viewer.addColormap(key, {R: [0, rgb[0]], G: [0, rgb[1]], B: [0, rgb[2]], A: [0, 255], I: [0, 255]});
    image.colormap = key;
    image.cal_min = 0.5;
    image.cal_max = 1;
    image.opacity = OVERLAY_OPACITY;
    if (count) {
      // the region's voxel nearest its centroid (a centroid can fall outside, e.g. between the lungs)
      const [cx, cy, cz] = [sx / count, sy / count, sz / count];
      let best = -1;
      let bestDistance = Infinity;
      for (let index = 0; index < labels.length; index++) {
        if (img[index] !== 1) continue;
        const dx = (index % nx) - cx;
        const dy = (Math.floor(index / nx) % ny) - cy;
        const dz = Math.floor(index / (nx * ny)) - cz;
        const distance = dx * dx + dy * dy + dz * dz;
        if (distance < bestDistance) {
          bestDistance = distance;
          best = index;
        }
      }
      const mm = voxelToMM(image, best % nx, Math.floor(best / nx) % ny, Math.floor(best / (nx * ny)));
      viewer.scene.crosshairPos = viewer.mm2frac(mm);
    }
    viewer.updateGLVolume();
    app.activeRegion = name;
    for (const link of els.report.querySelectorAll('a.region-link')) {
      link.setAttribute('aria-current', String(link.dataset.region === name));
    }
    for (const item of els.report.querySelectorAll('.region-list li')) {
      item.classList.toggle('active', item.dataset.region === name);
    }
    setStatus(count ? `Showing the ${name} region.` : `The ${name} region is empty in this scan's region map.`);
    return true;
  }

  // -- downloads and delete ------------------------------------------------------------------------------------
  function filenameFrom(response) {
    const header = response.headers.get('Content-Disposition') || '';
    const match = /filename="?([^";]+)"?/i.exec(header);
    return match ? match[1] : null;
  }

  async function download(kind) {
    const id = app.studyId;
    if (!id) return;
    try {
      const response = await api(studyPath(id, `/${kind}`));
      const blob = await response.blob();
      const name = filenameFrom(response) || (kind === 'fhir' ? `${id}.fhir.json` : `${id}.sr.dcm`);
      const url = URL.createObjectURL(blob);
      const link = element('a', {href: url, download: name, hidden: ''});
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 30000);
    } catch (error) {
      setStatus(error.message, 'error');
    }
  }

  async function deleteStudy() {
    const id = app.studyId;
    if (!id || !window.confirm('Delete this study, its scan and its report from the server?')) return;
    try {
      await api(studyPath(id), {method: 'DELETE'});
    } catch (error) {
      setStatus(error.message, 'error');
      return;
    }
    generation += 1;
    resetStudy();
    history.replaceState(null, '', window.location.pathname + window.location.search);
    setState('idle');
    setStatus('The study was deleted from the server.');
    setProgress(null);
  }

  // -- wiring --------------------------------------------------------------------------------------------------
  els.input.addEventListener('change', () => {
    const file = els.input.files && els.input.files[0];
    handleFile(file);
    els.input.value = '';
  });

  let dragDepth = 0;
  const hasFiles = (event) => Array.from((event.dataTransfer && event.dataTransfer.types) || []).includes('Files');
  document.addEventListener('dragenter', (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    els.drop.classList.add('dragover');
  });
  document.addEventListener('dragover', (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = 'copy';
  });
  document.addEventListener('dragleave', () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) els.drop.classList.remove('dragover');
  });
  document.addEventListener('drop', (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault(); // anywhere on the page: never let the browser open the file
    dragDepth = 0;
    els.drop.classList.remove('dragover');
    const files = event.dataTransfer.files;
    if (files.length > 1) setStatus('Drop one file: a NIfTI volume or a .zip of one DICOM series.', 'error');
    else handleFile(files[0]);
  });

  for (const button of document.querySelectorAll('button[data-view]')) {
    button.addEventListener('click', () => applyView(button.dataset.view));
  }
  for (const button of document.querySelectorAll('button[data-window]')) {
    button.addEventListener('click', () => applyWindow(button.dataset.window));
  }
  els.fhir.addEventListener('click', () => download('fhir'));
  els.sr.addEventListener('click', () => download('sr'));
  els.remove.addEventListener('click', deleteStudy);

  /** Ask the server which model it runs (a 401 here shows the token field before any upload). */
  async function describeModel() {
    try {
      const model = await (await api('v1/model')).json();
      const kind = model.region_guided ? ', region-guided' : '';
      els.model.textContent = model.name ? `Model: ${model.name}${kind}` : '';
    } catch { /* older servers, network trouble: the page works without it */ }
  }

  viewerPromise = startViewer();
  describeModel();
  const resume = /^#study=([A-Za-z0-9]+)$/.exec(window.location.hash);
  if (resume) openStudy(resume[1], 'queued', ++generation);
})();
